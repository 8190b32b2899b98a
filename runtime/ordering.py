"""The narrator's chunks in order and once each, as a reader of ``user.out`` gets them.

``user.out`` is best-effort: a broker killed mid-answer loses the chunk it held, and the
narrator says the chunks of its last seconds again when the broker is back (so a reader
also gets copies). :class:`InOrder` gives each stream's chunks by ``seq``, each once;
a chunk after a gap is held for up to ``GAP_WAIT_S`` from its arrival while the gap may
still be filled, then it goes on without what is missing before it. A later gap gets its
own wait, counted from the first chunk that arrived behind it.
"""

from __future__ import annotations

from . import messages as m

GAP_WAIT_S = 5.0  # a broker restart and the narrator's re-sending fit in this


class InOrder:
    """Per stream: the next ``seq`` due, and the later chunks held (with when each came)
    until it comes. A stream's open gap is as old as the oldest chunk held behind it."""

    def __init__(self, gap_wait_s: float | None = None) -> None:
        self.gap_wait_s = GAP_WAIT_S if gap_wait_s is None else gap_wait_s
        self._due: dict[str, int] = {}
        self._held: dict[str, dict[int, tuple[m.Chunk, float]]] = {}

    def resume(self, stream: str, after: int) -> None:
        """The reader already has ``stream``'s chunks up to seq ``after``: give what
        follows it (a tail read from the middle of an answer)."""
        self._due[stream] = after + 1

    def offer(self, chunk: m.Chunk, now: float) -> list[m.Chunk]:
        """What can be given now that ``chunk`` came (nothing for a copy or while a gap
        before it is open)."""
        due = self._due.get(chunk.stream, 0)
        held = self._held.setdefault(chunk.stream, {})
        if chunk.seq < due or chunk.seq in held:
            return []  # a copy of one given or held
        held[chunk.seq] = (chunk, now)
        return self._release(chunk.stream, expired_before=None)

    def wait_s(self, now: float) -> float | None:
        """How long until a gap is given up on (None: none is open)."""
        opened = [since for held in self._held.values() if (since := _oldest(held)) is not None]
        return max(0.0, min(opened) + self.gap_wait_s - now) if opened else None

    def expire(self, now: float) -> list[m.Chunk]:
        """Every stream's held chunks that waited long enough, with what came in order
        after them; the gaps before them skipped, a later gap still waiting its turn."""
        out: list[m.Chunk] = []
        for stream in list(self._held):
            out += self._release(stream, expired_before=now - self.gap_wait_s)
        return out

    def _release(self, stream: str, expired_before: float | None) -> list[m.Chunk]:
        """The chunks due in order; a gap is skipped while the oldest chunk held behind
        it came at or before ``expired_before`` (None: no gap is skipped)."""
        held = self._held[stream]
        due = self._due.get(stream, 0)
        out: list[m.Chunk] = []
        while held:
            if due not in held:
                oldest = _oldest(held)
                if expired_before is None or oldest is None or oldest > expired_before:
                    break
                due = min(held)  # given up on what is missing before it
            out.append(held.pop(due)[0])
            due += 1
        self._due[stream] = due
        return out


def _oldest(held: dict[int, tuple[m.Chunk, float]]) -> float | None:
    """When the oldest of ``held`` came (None: nothing is held)."""
    return min((since for _, since in held.values()), default=None)
