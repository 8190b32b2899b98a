"""The narrator's chunks in order and once each, as a reader of ``user.out`` gets them.

``user.out`` is best-effort: a broker killed mid-answer loses the chunk it held, and the
narrator says the chunks of its last seconds again when the broker is back (so a reader
also gets copies). :class:`InOrder` gives each stream's chunks by ``seq``, each once;
a chunk after a gap is held for up to ``GAP_WAIT_S`` while the gap may still be filled,
then what is held goes on without it.
"""

from __future__ import annotations

from . import messages as m

GAP_WAIT_S = 5.0  # a broker restart and the narrator's re-sending fit in this


class InOrder:
    """Per stream: the next ``seq`` due, and the later chunks held until it comes."""

    def __init__(self, gap_wait_s: float | None = None) -> None:
        self.gap_wait_s = GAP_WAIT_S if gap_wait_s is None else gap_wait_s
        self._due: dict[str, int] = {}
        self._held: dict[str, dict[int, m.Chunk]] = {}
        self._gap_since: dict[str, float] = {}

    def offer(self, chunk: m.Chunk, now: float) -> list[m.Chunk]:
        """What can be given now that ``chunk`` came (nothing for a copy or while a gap
        before it is open)."""
        due = self._due.get(chunk.stream, 0)
        held = self._held.setdefault(chunk.stream, {})
        if chunk.seq < due or chunk.seq in held:
            return []  # a copy of one given or held
        held[chunk.seq] = chunk
        if chunk.seq > due:
            self._gap_since.setdefault(chunk.stream, now)
        return self._release(chunk.stream, skip_gap=False)

    def wait_s(self, now: float) -> float | None:
        """How long until a gap is given up on (None: none is open)."""
        if not self._gap_since:
            return None
        return max(0.0, min(self._gap_since.values()) + self.gap_wait_s - now)

    def expire(self, now: float) -> list[m.Chunk]:
        """The held chunks of every stream whose gap has waited long enough, gap skipped."""
        out: list[m.Chunk] = []
        for stream, since in list(self._gap_since.items()):
            if now - since >= self.gap_wait_s:
                out += self._release(stream, skip_gap=True)
        return out

    def _release(self, stream: str, skip_gap: bool) -> list[m.Chunk]:
        held = self._held[stream]
        due = self._due.get(stream, 0)
        out: list[m.Chunk] = []
        while held:
            if due not in held:
                if not skip_gap:
                    break
                due = min(held)  # given up on what is missing before it
            out.append(held.pop(due))
            due += 1
        self._due[stream] = due
        if not held:
            self._gap_since.pop(stream, None)
        return out
