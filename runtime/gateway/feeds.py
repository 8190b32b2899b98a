"""From the bus to HTTP: what the gateway's monitor has seen, and the two SSE feeds.

* :class:`Observer` reads everything as ``monitor`` and keeps the agents' states, the
  engine's figures, message counts and the conversations seen (for ``/v1/agents``,
  ``/healthz``, ``/metrics`` and the known-conversation check).
* :func:`follow_turn` streams one user turn's narrator chunks as ``chunk`` / ``final``
  / ``interrupted`` / ``error`` events, on top of :meth:`runtime.Connection.chat`.
* :func:`follow_tail` streams what is left of an answer whose response was lost, from
  the streams :class:`~.tails.Tails` holds.
* :func:`follow_bus` is the activity feed of ``/v1/events``.
* :class:`EventStream` is the ASGI response that carries either, ends it when the
  client goes away, and keeps idle connections alive with a comment every 15 s.
"""

from __future__ import annotations

import collections
import json
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectSendStream
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import messages as m
from ..bus import Subscription
from ..embed import Connection
from ..errors import ChorusError
from ..ordering import InOrder
from . import models as api
from .tails import HeldConversation, Tails

log = structlog.get_logger("gateway")

SILENT_AFTER_S = 5.0  # an agent beats every second: five missed beats is silence
ENGINE_SILENT_AFTER_S = 6.0  # the engine reports every 2 s
HEARTBEAT_EVERY_S = 5.0  # the activity feed passes at most one heartbeat per agent this often
KEEPALIVE_S = 15.0
KNOWN_CONVERSATIONS = 100_000
TAIL_SEED_S = 600.0  # a gateway that (re)connects holds the streams of this long ago again
# left out of the activity feed unless asked for by prefix: the narrator's text has its
# own route, a shadow narrator is never shown to users, acks are delivery plumbing
QUIET_PREFIXES = ("user.out", "shadow.user.out", "ack.")

Emit = Callable[[bytes], Awaitable[None]]  # writes one ready-made event


# -- what the monitor sees -----------------------------------------------------------------


@dataclass
class AgentSeen:
    name: str
    beat: m.Heartbeat | None = None
    last_heartbeat: float | None = None  # the sender's unix time
    restarting: bool = False
    gave_up: bool = False


@dataclass
class Observer:
    """Everything the gateway learns from the bus, updated by :meth:`see`."""

    agents: dict[str, AgentSeen] = field(default_factory=dict)
    restarts: collections.Counter[str] = field(default_factory=collections.Counter)
    engine: m.EngineStats | None = None
    engine_ts: float = 0.0
    messages: collections.Counter[str] = field(default_factory=collections.Counter)
    conversations: collections.OrderedDict[str, None] = field(
        default_factory=collections.OrderedDict
    )
    last_seen: float = 0.0  # monotonic time of the last envelope
    dropped: int = 0  # envelopes the observer was too slow to take
    tails: Tails = field(default_factory=Tails)

    def see(self, envelope: m.Envelope, *, live: bool = True) -> None:
        """Take one envelope into account (``live=False`` for history from the log,
        which updates state but not the message counts)."""
        if live:
            self.messages[envelope.topic] += 1
            self.last_seen = time.monotonic()
        body = envelope.body
        match body:
            case m.Heartbeat():
                agent = self._agent(envelope.topic.removeprefix("heartbeat."))
                agent.beat, agent.last_heartbeat = body, envelope.ts
                agent.restarting = agent.gave_up = False
            case m.EngineStats() if body.name == "engine":  # not a canary's candidate engine
                self.engine, self.engine_ts = body, envelope.ts
            case m.ProcessEvent() if envelope.topic == "sys.restart":
                self.restarts[body.process] += 1
                if body.process in self.agents:
                    self.agents[body.process].restarting = True
            case m.ProcessEvent() if envelope.topic == "sys.gave_up":
                self._agent(body.process).gave_up = True
            case m.Chunk() if envelope.conversation and envelope.topic == "user.out":
                self.remember(envelope.conversation)
                self.tails.add(envelope.conversation, body)
            case m.UserTurn() if envelope.conversation and envelope.topic == "user.in":
                self.remember(envelope.conversation)

    def _agent(self, name: str) -> AgentSeen:
        if name not in self.agents:
            self.agents[name] = AgentSeen(name)
        return self.agents[name]

    def remember(self, conversation: str) -> None:
        self.conversations[conversation] = None
        self.conversations.move_to_end(conversation)
        while len(self.conversations) > KNOWN_CONVERSATIONS:
            self.conversations.popitem(last=False)

    def agent_list(self, now: float | None = None) -> list[api.AgentOut]:
        """Every process seen, by name; the engine too once it has reported."""
        now = time.time() if now is None else now
        out = []
        for agent in self.agents.values():
            if agent.gave_up:
                state = "gave_up"
            elif agent.restarting:
                state = "restarting"
            elif agent.last_heartbeat is None or now - agent.last_heartbeat > SILENT_AFTER_S:
                state = "silent"
            else:
                state = agent.beat.state if agent.beat else "starting"
            out.append(
                api.AgentOut(
                    name=agent.name,
                    state=state,
                    last_heartbeat=agent.last_heartbeat,
                    task=agent.beat.task if agent.beat else None,
                    restarts=self.restarts[agent.name],
                )
            )
        if self.engine is not None:
            silent = now - self.engine_ts > ENGINE_SILENT_AFTER_S
            out.append(
                api.AgentOut(
                    name="engine",
                    state="silent" if silent else "busy" if self.engine.active_requests else "idle",
                    last_heartbeat=self.engine_ts,
                    task=None,
                    restarts=self.restarts["engine"],
                )
            )
        return sorted(out, key=lambda a: a.name)

    def engine_up(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.engine is not None and now - self.engine_ts <= ENGINE_SILENT_AFTER_S

    async def run(self, conn: Connection) -> None:
        """Watch everything until the connection closes."""
        with conn.subscribe("") as everything:
            async for envelope in everything:
                self.see(envelope)
                self.dropped = everything.dropped

    def seed_from_log(self, log_dir: Path, *, since: float, now: float | None = None) -> None:
        """What happened before the gateway connected: restarts since ``since`` (the
        instance's start) and the last few seconds of heartbeats and engine reports."""
        from orchestrator.log.query import LogQuery, query_envelopes

        now = time.time() if now is None else now
        warnings: list[str] = []
        queries = (
            # the needle lets the reader skip every line that is not a sys.* one unparsed
            LogQuery(since=since, topics=("sys.restart", "sys.gave_up"), needles=(b'"sys.',)),
            LogQuery(since=now - 2 * SILENT_AFTER_S, topics=("heartbeat.", "engine.stats")),
        )
        for query in queries:
            for envelope in query_envelopes(log_dir, query, warn=warnings.append):
                self.see(envelope, live=False)
        if warnings:
            log.warning("log_seed_skipped_lines", count=len(warnings), first=warnings[0])


def recent_chunks(log_dir: Path, *, now: float | None = None) -> list[m.Envelope]:
    """The narrator's ``user.out`` chunks of the last :data:`TAIL_SEED_S` in the bus log
    (a blocking read), for :meth:`Observer.see` to hold again, so that a restarted
    gateway can still give the tail of an answer. A stream the log holds redacted
    (``--log-redact``) is left out: its text is not there."""
    from orchestrator.log.query import LogQuery, query_envelopes
    from orchestrator.log.writer import REDACTED

    now = time.time() if now is None else now
    warnings: list[str] = []
    query = LogQuery(since=now - TAIL_SEED_S, topics=("user.out",), needles=(b'"user.out"',))
    chunks: list[m.Envelope] = []
    redacted: set[str] = set()
    for envelope in query_envelopes(log_dir, query, warn=warnings.append):
        if isinstance(envelope.body, m.Chunk) and envelope.topic == "user.out":
            chunks.append(envelope)
            if REDACTED.fullmatch(envelope.body.delta):
                redacted.add(envelope.body.stream)
    if warnings:
        log.warning("log_seed_skipped_lines", count=len(warnings), first=warnings[0])
    return [e for e in chunks if isinstance(e.body, m.Chunk) and e.body.stream not in redacted]


def conversation_in_log(log_dir: Path, conversation: str) -> bool:
    """Whether the bus log holds a user turn of ``conversation`` (a blocking read)."""
    from orchestrator.log.query import LogQuery, query_lines

    query = LogQuery(topics=("user.in",), conversation=conversation, newest_first=True, limit=1)
    return any(True for _ in query_lines(log_dir, query, warn=lambda _: None))


# -- the chat stream -----------------------------------------------------------------------


@dataclass(eq=False)
class ChatTurn:
    """One ``POST /v1/chat`` in flight; a newer turn on its conversation supersedes it."""

    conversation: str
    superseded: anyio.Event = field(default_factory=anyio.Event)


class ActiveTurns:
    """The turn each conversation streams now."""

    def __init__(self) -> None:
        self._active: dict[str, ChatTurn] = {}

    def begin(self, conversation: str) -> ChatTurn:
        """A new turn; the one it replaces (if any) is told it was superseded."""
        previous = self._active.get(conversation)
        if previous is not None:
            previous.superseded.set()
        turn = self._active[conversation] = ChatTurn(conversation)
        return turn

    def end(self, turn: ChatTurn) -> None:
        if self._active.get(turn.conversation) is turn:
            del self._active[turn.conversation]

    def __len__(self) -> int:
        return len(self._active)


def sse(event: str, data: BaseModel | bytes) -> bytes:
    """One Server-Sent Event (the data is one line of JSON)."""
    payload = data if isinstance(data, bytes) else data.model_dump_json().encode()
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


async def read_sse(lines: AsyncIterable[str]) -> AsyncIterator[tuple[str, Any]]:
    """The (event, data) pairs of what :func:`sse` wrote, read back from its lines
    (e.g. ``httpx.Response.aiter_lines()``); comments are skipped."""
    event, data = "", ""
    async for line in lines:
        if line.startswith(":"):
            continue
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif line == "" and event:
            yield event, json.loads(data)
            event, data = "", ""


def chunk_events(conversation: str, chunk: m.Chunk) -> tuple[list[bytes], bool]:
    """The SSE events of one narrator chunk, and whether they end the response (an
    interruption, or the final chunk that closes the turn)."""
    events = []
    if chunk.delta:
        event = api.ChunkEvent(
            conversation=conversation,
            stream=chunk.stream,
            seq=chunk.seq,
            delta=chunk.delta,
            notice=chunk.notice,
        )
        events.append(sse("chunk", event))
    if not chunk.final:
        return events, False
    if chunk.finish == "interrupted":
        interrupted = api.InterruptedEvent(conversation=conversation, stream=chunk.stream)
        return [*events, sse("interrupted", interrupted)], True
    final = api.FinalEvent(
        conversation=conversation,
        stream=chunk.stream,
        finish="error" if chunk.finish == "error" else "done",
        sources=list(chunk.sources),
        closes_turn=chunk.closes_turn,
    )
    return [*events, sse("final", final)], chunk.closes_turn


async def follow_turn(
    conn: Connection,
    turn: ChatTurn,
    text: str,
    emit: Emit,
    *,
    grace_s: float,
    timeout_s: float,
) -> None:
    """Publish ``text`` as a user turn and emit the narrator's answer to it.

    The chunks are those :meth:`Connection.chat` picks (this turn's, by turn id). When a
    newer turn supersedes this one, the narrator's own ``interrupted`` chunk is awaited
    for ``grace_s`` (it comes when the narrator was speaking); after that the gateway
    ends the response with ``interrupted`` itself, so a superseded request always ends.
    """
    conversation = turn.conversation
    stream = ""

    async def follow() -> bool:
        nonlocal stream
        async with aclosing(conn.chat(text, conversation=conversation)) as chunks:
            async for chunk in chunks:
                stream = chunk.stream
                events, ends = chunk_events(conversation, chunk)
                for event in events:
                    await emit(event)
                if ends:
                    return True
        return False  # the subscription ended: the bus closed

    async def grace_after_superseded(scope: anyio.CancelScope) -> None:
        await turn.superseded.wait()
        scope.deadline = min(scope.deadline, anyio.current_time() + grace_s)

    ended = False
    error = ""
    with anyio.move_on_after(timeout_s) as overall:
        with anyio.CancelScope() as following:
            async with anyio.create_task_group() as tg:
                tg.start_soon(grace_after_superseded, following)
                try:
                    ended = await follow()
                except ChorusError as exc:
                    error = str(exc)
                tg.cancel_scope.cancel()
    if ended:
        return
    if turn.superseded.is_set():
        interrupted = api.InterruptedEvent(conversation=conversation, stream=stream)
        await emit(sse("interrupted", interrupted))
        return
    if overall.cancelled_caught:
        error = f"no answer within {timeout_s:g} s; the turn may still be answered later"
    await emit(sse("error", api.ErrorEvent(error=error or "the bus connection closed")))


async def follow_tail(
    held: HeldConversation,
    conversation: str,
    stream: str | None,
    after: int,
    emit: Emit,
    *,
    timeout_s: float,
    gap_wait_s: float | None = None,
) -> None:
    """Emit what is left of the turn that ``stream`` answers, from its chunk after
    ``after`` (``stream`` None: the conversation's latest turn from its start), then
    follow the turn live until it closes, is interrupted, or says nothing for
    ``timeout_s``. The events are those of :func:`follow_turn`, in the same order
    (:class:`~runtime.ordering.InOrder`, as ``Connection.chat``): each stream's chunks by
    ``seq``, a chunk after a gap held for up to ``gap_wait_s`` from when this reader first
    saw it while a late chunk may fill the gap, then given without what is missing."""
    first = held.find(stream) if stream is not None else None
    if first is None:
        turn = held.turn_of_latest() or ""
        first, after = held.of_turn(turn)[0], -1
    turn = first.turn
    had: set[str] = set()  # the streams the client had whole, before the one it names
    for earlier in held.of_turn(turn):
        if earlier is first:
            break
        had.add(earlier.stream)
    order = InOrder(gap_wait_s)
    order.resume(first.stream, after)
    last_stream = first.stream
    with anyio.move_on_after(timeout_s) as quiet:
        while True:
            seen = held.version
            now = anyio.current_time()
            ready = [
                given
                for one in held.of_turn(turn)
                if one.stream not in had
                for chunk in one.chunks  # what was given or is held comes back as nothing
                for given in order.offer(chunk, now)
            ]
            for chunk in ready + order.expire(now):
                last_stream = chunk.stream
                events, ends = chunk_events(conversation, chunk)
                for event in events:
                    await emit(event)
                if ends:
                    return
                quiet.deadline = anyio.current_time() + timeout_s
            if held.superseded(turn):
                interrupted = api.InterruptedEvent(conversation=conversation, stream=last_stream)
                await emit(sse("interrupted", interrupted))
                return
            if held.version != seen:
                continue  # chunks came while this was emitting: read them before waiting
            gap = order.wait_s(anyio.current_time())
            with anyio.move_on_after(math.inf if gap is None else gap):
                await held.changed()
    error = f"nothing more of this answer within {timeout_s:g} s; it may still come later"
    await emit(sse("error", api.ErrorEvent(error=error)))


# -- the activity feed ---------------------------------------------------------------------


def feed_prefixes(asked: Iterable[str]) -> tuple[str, ...]:
    """The subscriptions for the prefixes asked (none: everything); a prefix inside
    another one asked is dropped, so no envelope comes twice."""
    unique = sorted(set(asked))
    return tuple(p for p in unique if not any(p != q and p.startswith(q) for q in unique)) or ("",)


async def follow_bus(conn: Connection, asked: tuple[str, ...], emit: Emit) -> None:
    """Emit envelopes whose topic starts with one of ``asked`` (none: everything but
    :data:`QUIET_PREFIXES`), each as ``event: <topic>``; heartbeats at most one per
    agent per :data:`HEARTBEAT_EVERY_S`, and at once when its state or task changes."""
    prefixes = feed_prefixes(asked)
    quiet = QUIET_PREFIXES if not asked else ()
    last_beat: dict[str, tuple[float, str, str | None]] = {}
    send, receive = anyio.create_memory_object_stream[m.Envelope](1000)
    subscriptions = [conn.subscribe(p) for p in prefixes]

    async def pump(subscription: Subscription, out: MemoryObjectSendStream[m.Envelope]) -> None:
        async with out:  # the feed ends once every subscription has (the bus closed)
            async for envelope in subscription:
                await out.send(envelope)

    def passes(envelope: m.Envelope) -> bool:
        if quiet and envelope.topic.startswith(quiet):
            return False
        body = envelope.body
        if not isinstance(body, m.Heartbeat):
            return True
        now = time.monotonic()
        seen = last_beat.get(envelope.sender)
        if (
            seen is not None
            and now - seen[0] < HEARTBEAT_EVERY_S
            and seen[1:]
            == (
                body.state,
                body.task,
            )
        ):
            return False
        last_beat[envelope.sender] = (now, body.state, body.task)
        return True

    try:
        async with anyio.create_task_group() as tg:
            for subscription in subscriptions:
                tg.start_soon(pump, subscription, send.clone())
            send.close()
            async for envelope in receive:
                if passes(envelope):
                    await emit(sse(envelope.topic, msgspec.json.encode(envelope)))
    finally:
        for subscription in subscriptions:
            subscription.close()


# -- the response --------------------------------------------------------------------------


class EventStream(Response):
    """A ``text/event-stream`` response fed by ``produce(emit)``; it ends when ``produce``
    returns or when the client disconnects (then ``produce`` is cancelled)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        produce: Callable[[Emit], Awaitable[None]],
        *,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        # no super().__init__(): it would set Content-Length for an empty body
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        )
        self.produce = produce
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lock = anyio.Lock()
        gone = False

        async def write(body: bytes, more: bool = True) -> None:
            nonlocal gone
            if gone:
                return
            async with lock:
                try:
                    await send({"type": "http.response.body", "body": body, "more_body": more})
                except OSError:  # the client went away while we wrote
                    gone = True

        async def emit(data: bytes) -> None:
            await write(data)
            if gone:
                tg.cancel_scope.cancel()

        async def watch_disconnect() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            tg.cancel_scope.cancel()

        async def keepalive() -> None:
            while True:
                await anyio.sleep(KEEPALIVE_S)
                await write(b": keepalive\n\n")

        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await write(b": stream open\n\n")
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_disconnect)
                tg.start_soon(keepalive)
                await self.produce(emit)
                tg.cancel_scope.cancel()
            await write(b"", more=False)
        finally:
            if self.on_close is not None:
                self.on_close()
