"""``engine.Client``: the async client every other process uses to reach the engine.

    async with engine.Client.connect("narrator", data_dir) as llm:
        await llm.open("c1", system_prompt="Be brief.")
        await llm.append("c1", messages=[Message(role="user", content="hi")], generation_prompt=True)
        async for chunk in llm.generate("c1", SamplingParams(temperature=0)):
            print(chunk.delta, end="")

One DEALER socket per client; a reader task routes each reply to the request that
asked. Leaving a ``generate`` loop early cancels the request on the engine. A watcher
task fails every request in flight with ``EngineUnavailable`` the moment the connection
drops (the engine exited or restarted): what it was computing is gone, and waiting out
the reply timeout would keep the user in silence.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
import msgspec
import zmq
import zmq.asyncio
from anyio.streams.memory import MemoryObjectSendStream
from zmq.utils.monitor import parse_monitor_message

from engine.protocol import (
    AnyReply,
    AnyRequest,
    Append,
    Cancel,
    Chunk,
    Close,
    Complete,
    Done,
    Failed,
    Generate,
    Message,
    Open,
    Stats,
    StatsReply,
    encoder,
    reply_decoder,
)
from engine.sampling import SamplingParams
from runtime.errors import ChorusError
from runtime.keys import curve_client, load_public
from runtime.paths import DataDir


class EngineError(ChorusError):
    """The engine refused a request; ``kind`` says why (see ``protocol.ErrorKind``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SessionLost(EngineError):
    """The session was evicted (idle too long, or too many sessions), or the engine does
    not know it (it restarted since it was opened); open it again."""


class EngineUnavailable(ChorusError):
    """No reply from the engine in time: it is down, restarting or overloaded."""


class Client:
    """An authenticated connection to the engine, as one identity."""

    def __init__(
        self, identity: str, endpoint: str, key_dir: Path, *, timeout: float = 30.0
    ) -> None:
        self.identity = identity
        self.endpoint = endpoint
        self.key_dir = key_dir
        self.timeout = timeout  # for replies that are not streams, and between stream chunks
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._waiting: dict[str, MemoryObjectSendStream[AnyReply]] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{identity}-{os.getpid():x}-"
        self._tg: anyio.abc.TaskGroup | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self.disconnects = 0  # times the connection to the engine dropped

    @classmethod
    def connect(
        cls, identity: str, data_dir: str | os.PathLike[str] | None = None, **kw: float
    ) -> Client:
        """A client for the engine of the instance in ``data_dir``."""
        data = DataDir.at(data_dir)
        return cls(identity, data.ipc("engine"), data.keys, **kw)

    async def __aenter__(self) -> Self:
        sock = self._ctx.socket(zmq.DEALER)
        curve_client(sock, self.key_dir, self.identity, load_public(self.key_dir, "engine"))
        sock.linger = 0
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # queue nothing for an engine that is not there: a request waits (up to the
        # timeout) for a live connection instead of piling up for an engine started later
        sock.setsockopt(zmq.IMMEDIATE, 1)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self._sock = sock
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._read_loop)
        self._tg.start_soon(self._watch_loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
                await self._tg.__aexit__(None, None, None)
        finally:  # closed from a cancelled task too: a socket left open hangs term() in GC
            for stream in self._waiting.values():
                stream.close()
            if self._sock is not None:
                if self._monitor is not None:
                    self._sock.disable_monitor()
                    self._monitor.close(linger=0)
                self._sock.close(linger=0)
            self._ctx.term()

    async def _read_loop(self) -> None:
        assert self._sock is not None
        while True:
            payload = await self._sock.recv()
            try:
                reply = reply_decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            stream = self._waiting.get(reply.id)
            if stream is not None:
                try:
                    stream.send_nowait(reply)
                except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass

    async def _watch_loop(self) -> None:
        """On a dropped connection, end every request in flight (see the module doc)."""
        assert self._monitor is not None
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
                for stream in self._waiting.values():
                    stream.close()  # the request's receive ends: EngineUnavailable

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    async def _call(self, request: AnyRequest) -> AnyReply:
        async for reply in self._exchange(request):
            return reply
        raise EngineUnavailable("the engine closed the request without a reply")

    async def _exchange(self, request: AnyRequest) -> AsyncIterator[AnyReply]:
        assert self._sock is not None, "use `async with Client(...)`"
        send, recv = anyio.create_memory_object_stream[AnyReply](10_000)
        self._waiting[request.id] = send
        try:
            with anyio.move_on_after(self.timeout) as sending:
                await self._sock.send(encoder.encode(request))
            if sending.cancelled_caught:
                raise EngineUnavailable(
                    f"the engine at {self.endpoint} took no request in {self.timeout:g} s; is it running?"
                )
            while True:
                with anyio.move_on_after(self.timeout) as scope:
                    try:
                        reply = await recv.receive()
                    except anyio.EndOfStream:
                        raise EngineUnavailable(
                            f"the connection to the engine at {self.endpoint} dropped "
                            "(it exited or restarted); the request is lost, send it again"
                        ) from None
                if scope.cancelled_caught:
                    raise EngineUnavailable(
                        f"no reply from the engine at {self.endpoint} in {self.timeout:g} s; is it running?"
                    )
                if isinstance(reply, Failed):
                    lost = reply.kind in ("session_lost", "unknown_session")
                    cls = SessionLost if lost else EngineError
                    raise cls(reply.kind, reply.message)
                yield reply
        finally:
            del self._waiting[request.id]
            send.close()
            recv.close()

    # -- operations ---------------------------------------------------------------------------

    async def open(self, session: str, system_prompt: str | None = None) -> None:
        """Create (or reset) a session, optionally with a system prompt."""
        await self._call(Open(id=self._new_id(), session=session, system_prompt=system_prompt))

    async def append(
        self,
        session: str,
        text: str | None = None,
        *,
        messages: list[Message] | None = None,
        generation_prompt: bool = False,
    ) -> int:
        """Add text or chat messages; returns the session's token count afterwards."""
        reply = await self._call(
            Append(
                id=self._new_id(),
                session=session,
                text=text,
                messages=messages or [],
                generation_prompt=generation_prompt,
            )
        )
        assert isinstance(reply, Done)
        return reply.tokens

    async def generate(
        self, session: str, params: SamplingParams | None = None
    ) -> AsyncIterator[Chunk]:
        """Stream tokens from the session. Breaking out of the loop cancels the request."""
        async for chunk in self._stream(
            Generate(id=self._new_id(), session=session, params=params or SamplingParams())
        ):
            yield chunk

    async def complete(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[Message] | None = None,
        background: bool = False,
    ) -> AsyncIterator[Chunk]:
        """One-shot generation (no session kept): a prompt or chat messages in, chunks out.
        ``background`` work runs only while no other request has work (summaries)."""
        request = Complete(
            id=self._new_id(),
            prompt=prompt,
            messages=messages or [],
            params=params or SamplingParams(),
            background=background,
        )
        async for chunk in self._stream(request):
            yield chunk

    async def complete_text(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[Message] | None = None,
        background: bool = False,
    ) -> str:
        """The whole text of a one-shot generation."""
        chunks = self.complete(prompt, params, messages=messages, background=background)
        return "".join([c.delta async for c in chunks])

    async def _stream(self, request: Generate | Complete) -> AsyncIterator[Chunk]:
        finished = False
        try:
            async for reply in self._exchange(request):
                assert isinstance(reply, Chunk)
                finished = bool(reply.finish)
                yield reply
                if finished:
                    return
        finally:
            if not finished and self._sock is not None:
                cancel = encoder.encode(Cancel(id=self._new_id(), request=request.id))
                # never wait here: with no engine to take it, there is nothing to cancel
                with anyio.CancelScope(shield=True):
                    try:
                        await self._sock.send(cancel, zmq.NOBLOCK)
                    except zmq.Again:
                        pass

    async def cancel(self, request: str) -> None:
        """Stop a running generation by its request id."""
        await self._call(Cancel(id=self._new_id(), request=request))

    async def close(self, session: str) -> None:
        """Forget a session."""
        await self._call(Close(id=self._new_id(), session=session))

    async def stats(self) -> StatsReply:
        """The engine's figures (also published on ``engine.stats``)."""
        reply = await self._call(Stats(id=self._new_id()))
        assert isinstance(reply, StatsReply)
        return reply
