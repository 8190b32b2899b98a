"""The narrator's recent streams, held so a client that lost its connection can ask for
the rest of an answer (``GET /v1/chat/{conversation}/tail``).

The gateway's monitor sees every ``user.out`` chunk; :class:`Tails` keeps them per
conversation, the most recently active conversations first, up to ``MAX_CHUNKS`` chunks
in all (the least recently active conversation goes first). A stream is one narrator
utterance; a turn (the user's ``user.in``) may be answered by several streams, a notice
and then the answer, and ends with a final chunk that ``closes_turn``.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

import anyio

from .. import messages as m

MAX_CHUNKS = 20_000  # in all conversations: about 8 MiB (a held chunk takes ~400 bytes)
STREAMS_PER_CONVERSATION = 8


@dataclass(eq=False)
class HeldStream:
    """One narrator stream as seen so far."""

    stream: str
    turn: str  # the user.in it answers; its own id when it answers none
    chunks: list[m.Chunk] = field(default_factory=list)  # by seq


@dataclass(eq=False)
class HeldConversation:
    """The last :data:`STREAMS_PER_CONVERSATION` streams of one conversation, oldest
    first; :meth:`changed` wakes whoever follows it."""

    streams: list[HeldStream] = field(default_factory=list)
    version: int = 0  # counts the chunks added: a reader compares it to see it missed none
    _changed: anyio.Event | None = None

    def find(self, stream: str) -> HeldStream | None:
        return next((s for s in self.streams if s.stream == stream), None)

    def turn_of_latest(self) -> str | None:
        return self.streams[-1].turn if self.streams else None

    def of_turn(self, turn: str) -> list[HeldStream]:
        return [s for s in self.streams if s.turn == turn]

    def superseded(self, turn: str) -> bool:
        """Whether a stream of a later turn came after the first of ``turn``'s."""
        turns = [s.turn for s in self.streams]
        return turn in turns and any(t != turn for t in turns[turns.index(turn) :])

    async def changed(self) -> None:
        """Until the next chunk of this conversation arrives."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def _notify(self) -> None:
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class Tails:
    """Every conversation's recent streams, bounded by :data:`MAX_CHUNKS` in all."""

    def __init__(self, max_chunks: int = MAX_CHUNKS) -> None:
        self.max_chunks = max_chunks
        self.held = 0
        self._conversations: collections.OrderedDict[str, HeldConversation] = (
            collections.OrderedDict()
        )

    def get(self, conversation: str) -> HeldConversation | None:
        return self._conversations.get(conversation)

    def add(self, conversation: str, chunk: m.Chunk) -> None:
        """Hold one chunk of ``user.out`` (a repeat of a held seq is ignored)."""
        held = self._conversations.get(conversation)
        if held is None:
            held = self._conversations[conversation] = HeldConversation()
        self._conversations.move_to_end(conversation)
        stream = held.find(chunk.stream)
        if stream is None:
            stream = HeldStream(chunk.stream, chunk.turn or chunk.stream)
            held.streams.append(stream)
            if len(held.streams) > STREAMS_PER_CONVERSATION:
                self.held -= len(held.streams.pop(0).chunks)
        if not stream.chunks or chunk.seq > stream.chunks[-1].seq:
            stream.chunks.append(chunk)
        else:
            at = bisect.bisect_left(stream.chunks, chunk.seq, key=lambda c: c.seq)
            if at < len(stream.chunks) and stream.chunks[at].seq == chunk.seq:
                return  # said again (the narrator does after a broker restart): one is held
            stream.chunks.insert(at, chunk)  # a late one fills its gap
        self.held += 1
        held._notify()
        while self.held > self.max_chunks and len(self._conversations) > 1:
            _, oldest = self._conversations.popitem(last=False)
            self.held -= sum(len(s.chunks) for s in oldest.streams)

    def __len__(self) -> int:
        return len(self._conversations)
