"""The bus client every process uses: publish, subscribe, and at-least-once delivery.

One :class:`Bus` holds a PUB socket to the broker's XSUB side and a SUB socket to its
XPUB side, both CURVE clients with the process's own key. A single reader task decodes
what arrives and hands each envelope to every :class:`Subscription` whose prefix
matches. ZeroMQ reconnects and re-sends subscriptions by itself after a broker
restart; what was in flight is covered by acknowledgements:

* ``user.in``, ``task.assign.*`` and ``narrator.cue`` are *reliable*. Their designated
  receiver (``acl.receiver_of``) publishes :class:`~runtime.messages.Ack` with the
  envelope id on ``ack.<sender>``; the sender re-sends the same envelope with capped
  exponential backoff until that ack arrives; the receiver delivers each id once.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
import msgspec
import structlog
import zmq
import zmq.asyncio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import acl
from . import messages as m
from .errors import BusClosed, MessageRejected
from .keys import curve_client
from .paths import Endpoints
from .recent import RecentIds

log = structlog.get_logger("bus")

RESEND_FIRST_S = 0.25
RESEND_CAP_S = 4.0
SEEN_IDS = 10_000


@dataclass
class _Pending:
    frames: list[bytes]
    receiver: str
    next_at: float
    delay: float
    done: anyio.Event = field(default_factory=anyio.Event)
    rejected: str = ""  # why the broker refused it, if it did


class Subscription:
    """Envelopes whose topic starts with ``prefix``; iterate it with ``async for``."""

    def __init__(self, bus: Bus, prefix: str, buffer: int) -> None:
        self.prefix = prefix
        self._bus = bus
        self._send: MemoryObjectSendStream[m.Envelope]
        self._recv: MemoryObjectReceiveStream[m.Envelope]
        self._send, self._recv = anyio.create_memory_object_stream[m.Envelope](buffer)
        self.dropped = 0  # envelopes this subscriber was too slow to take

    def _offer(self, envelope: m.Envelope) -> None:
        try:
            self._send.send_nowait(envelope)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> m.Envelope:
        try:
            return await self._recv.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def receive(self) -> m.Envelope:
        """The next envelope; raises ``anyio.EndOfStream`` once the bus closes."""
        return await self._recv.receive()

    def close(self) -> None:
        """Stop receiving; the bus unsubscribes when no other subscription needs it."""
        self._bus._unsubscribe(self)
        self._send.close()
        self._recv.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bus:
    """An authenticated connection to the broker, as one identity.

    Use as ``async with Bus(identity, endpoints, key_dir) as bus:``.
    """

    def __init__(
        self,
        identity: str,
        endpoints: Endpoints,
        key_dir: Path,
        *,
        ready_timeout: float = 10.0,
    ) -> None:
        self.identity = identity
        self.endpoints = endpoints
        self.key_dir = key_dir
        self.ready_timeout = ready_timeout
        self._stamper = m.Stamper(identity)
        self._ctx = zmq.asyncio.Context()
        self._pub: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._subs: list[Subscription] = []
        self._prefix_count: collections.Counter[str] = collections.Counter()
        self._pending: dict[str, _Pending] = {}
        self._rejected: collections.OrderedDict[str, _Pending] = collections.OrderedDict()
        self._wake = anyio.Event()
        self._seen = RecentIds(SEEN_IDS)
        self._tg: TaskGroup | None = None
        self._closed = False
        self.resent = 0  # re-sends of reliable messages, for tests and stats

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        pub = self._ctx.socket(zmq.PUB)
        sub = self._ctx.socket(zmq.SUB)
        server = self.endpoints.broker_public_key.encode()
        for sock in (pub, sub):
            curve_client(sock, self.key_dir, self.identity, server)
            sock.linger = 0
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        pub.setsockopt(zmq.SNDHWM, 10_000)
        sub.setsockopt(zmq.RCVHWM, 10_000)
        # acks for our reliable messages come here for the whole life of the bus
        own_acks = acl.ack_topic(self.identity)
        sub.setsockopt(zmq.SUBSCRIBE, own_acks.encode())
        self._prefix_count[own_acks] += 1
        if self.identity != "monitor" and acl.may_read(self.identity, "sys.rejected"):
            # so a refused reliable message stops being re-sent
            sub.setsockopt(zmq.SUBSCRIBE, b"sys.rejected")
            self._prefix_count["sys.rejected"] += 1
        pub.connect(self.endpoints.pub)
        sub.connect(self.endpoints.sub)
        self._pub, self._sub = pub, sub
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._read_loop)
        self._tg.start_soon(self._resend_loop)
        try:
            await self._wait_ready()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the sockets and end every subscription."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
                await self._tg.__aexit__(None, None, None)
        finally:  # closed from a cancelled task too: a socket left open hangs term() in GC
            for sub in list(self._subs):
                sub._send.close()  # ends every `async for` over it
                sub._recv.close()
            for sock in (self._pub, self._sub):
                if sock is not None:
                    sock.close(linger=0)
            self._ctx.term()

    async def _wait_ready(self) -> None:
        """Round-trip an ack to ourselves: proves both sockets reach the broker."""
        if self.identity == "monitor":  # may not publish; give the handshake a moment
            await anyio.sleep(0.2)
            return
        nonce = f"ready-{m.new_id()}"
        with self.subscribe(acl.ack_topic(self.identity)) as acks:
            with anyio.fail_after(self.ready_timeout):
                while True:
                    await self.publish(acl.ack_topic(self.identity), m.Ack(id=nonce))
                    with anyio.move_on_after(0.2):
                        async for env in acks:
                            if isinstance(env.body, m.Ack) and env.body.id == nonce:
                                return

    # -- publishing ----------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        body: m.Body,
        *,
        conversation: str | None = None,
        task: str | None = None,
    ) -> m.Envelope:
        """Publish ``body`` on ``topic``. Reliable topics are re-sent until acknowledged
        (see :meth:`delivered`); everything else is best-effort."""
        envelope = self._stamper.stamp(topic, body, conversation=conversation, task=task)
        await self.send(envelope)
        return envelope

    async def send(self, envelope: m.Envelope) -> None:
        """Send a ready-made envelope (its ``sender`` must be this bus's identity)."""
        if self._closed or self._pub is None:
            raise BusClosed(f"the bus of {self.identity} is closed; open a new Bus")
        frames = [envelope.topic.encode(), m.encode(envelope)]
        if len(frames[1]) > self.endpoints.max_bytes:
            raise MessageRejected(
                f"{envelope.topic} message of {len(frames[1])} bytes exceeds the broker's "
                f"{self.endpoints.max_bytes}-byte limit; nothing was sent"
            )
        receiver = acl.receiver_of(envelope.topic)
        if receiver is not None:
            self._pending[envelope.id] = _Pending(
                frames, receiver, time.monotonic() + RESEND_FIRST_S, RESEND_FIRST_S
            )
            self._wake.set()
        await self._pub.send_multipart(frames)

    async def delivered(self, envelope_id: str) -> None:
        """Wait until a reliable message was acknowledged (returns at once if it was);
        raises :class:`MessageRejected` if the broker refused it instead. Bound the wait
        with ``anyio.fail_after``."""
        pending = self._pending.get(envelope_id) or self._rejected.get(envelope_id)
        if pending is not None:
            await pending.done.wait()
            if pending.rejected:
                raise MessageRejected(pending.rejected)

    @property
    def unacknowledged(self) -> int:
        """How many reliable messages still wait for their ack."""
        return len(self._pending)

    async def _resend_loop(self) -> None:
        while True:
            now = time.monotonic()
            due = [p for p in self._pending.values() if p.next_at <= now]
            for p in due:
                p.delay = min(p.delay * 2, RESEND_CAP_S)
                p.next_at = now + p.delay
                self.resent += 1
                assert self._pub is not None
                await self._pub.send_multipart(p.frames)
            wait = min((p.next_at for p in self._pending.values()), default=now + 60) - now
            self._wake = anyio.Event()
            with anyio.move_on_after(max(wait, 0.01)):
                await self._wake.wait()

    # -- subscribing ---------------------------------------------------------------------

    def subscribe(self, prefix: str, buffer: int = 1000) -> Subscription:
        """A new subscription to every topic starting with ``prefix``."""
        if self._closed or self._sub is None:
            raise BusClosed(f"the bus of {self.identity} is closed; open a new Bus")
        sub = Subscription(self, prefix, buffer)
        self._subs.append(sub)
        if self._prefix_count[prefix] == 0:
            self._sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self._prefix_count[prefix] += 1
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub not in self._subs:
            return
        self._subs.remove(sub)
        self._prefix_count[sub.prefix] -= 1
        if self._prefix_count[sub.prefix] == 0 and self._sub is not None and not self._closed:
            self._sub.setsockopt(zmq.UNSUBSCRIBE, sub.prefix.encode())

    async def _read_loop(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart()
            if len(frames) != 2:
                continue
            try:
                envelope = m.decode(frames[1])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("undecodable_envelope", topic=frames[0][:80], error=str(exc))
                continue
            if not await self._accept(envelope):
                continue
            for sub in self._subs:
                if envelope.topic.startswith(sub.prefix):
                    sub._offer(envelope)

    async def _accept(self, envelope: m.Envelope) -> bool:
        """Handle acks; acknowledge and de-duplicate reliable messages meant for us."""
        body = envelope.body
        if isinstance(body, m.Ack) and envelope.topic == acl.ack_topic(self.identity):
            pending = self._pending.get(body.id)
            if pending is not None and envelope.sender == pending.receiver:
                del self._pending[body.id]
                pending.done.set()
        if (
            isinstance(body, m.Rejected)
            and envelope.sender == "broker"
            and body.sender == self.identity
            and body.id
        ):
            pending = self._pending.pop(body.id, None)
            if pending is not None:
                log.warning("message_rejected", topic=body.topic, reason=body.reason)
                pending.rejected = f"the broker refused {body.topic}: {body.reason}"
                pending.done.set()
                self._rejected[body.id] = pending
                if len(self._rejected) > 1000:
                    self._rejected.popitem(last=False)
        if acl.receiver_of(envelope.topic) != self.identity:
            return True
        await self.publish(acl.ack_topic(envelope.sender), m.Ack(id=envelope.id))
        return self._seen.add(envelope.id)
