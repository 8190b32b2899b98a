"""The broker's forwarding loop in C (runtime/_forward.c), on real sockets.

The broker tests run it end to end; these pin down the split it makes: a message goes
through in C only when every check is known to pass, and every other message reaches
the Python callback (which decides) whole, in order, with the CURVE identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from runtime import _forward
from runtime import messages as m
from runtime.auth import Authenticator
from runtime.keys import curve_client, curve_server, load_public
from runtime.paths import DataDir

MAX_BYTES = 1 << 20
Message = tuple[str, list[bytes]]


class Loop:
    """One call of ``forward`` after another from ``source`` to ``sink``, recording
    what went to the Python side and to the log."""

    def __init__(self, source: zmq.Socket[Any], sink: zmq.Socket[Any]) -> None:
        self.source, self.sink = source, sink
        self.verdicts: dict[tuple[str, str, type], Any] = {}
        self.log: list[bytes] = []
        self.other: list[Message] = []
        self.on_other: Callable[[str, list[bytes]], None] = self._record

    def _record(self, identity: str, frames: list[bytes]) -> None:
        self.other.append((identity, frames))

    def run(self, limit: int = 256) -> int:
        return _forward.forward(
            self.source.underlying,
            self.sink.underlying,
            limit,
            m.decode,
            self.verdicts,
            self.log,
            MAX_BYTES,
            lambda identity, frames: self.on_other(identity, frames),
        )

    def until(self, count: int) -> int:
        """Call until ``count`` messages were handled either way; how many went out."""
        sent = 0
        deadline = time.monotonic() + 10
        while sent + len(self.other) < count and time.monotonic() < deadline:
            self.source.poll(100)
            sent += self.run()
        return sent


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def sockets(ctx: zmq.Context[Any]) -> Iterator[tuple[zmq.Socket[Any], ...]]:
    """A publisher, the loop's source and sink, and a reader of the sink, on inproc
    (so with no ZAP identity: "unknown")."""
    with (
        ctx.socket(zmq.PAIR) as pub,
        ctx.socket(zmq.PAIR) as source,
        ctx.socket(zmq.PAIR) as sink,
        ctx.socket(zmq.PAIR) as reader,
    ):
        pub.bind("inproc://forward-in")
        source.connect("inproc://forward-in")
        sink.bind("inproc://forward-out")
        reader.connect("inproc://forward-out")
        yield pub, source, sink, reader


def note(topic: str = "event.coder", sender: str = "unknown") -> bytes:
    return m.encode(m.Stamper(sender).stamp(topic, m.Note(name="n")))


def allowed(loop: Loop, topic: str = "event.coder") -> None:
    loop.verdicts[("unknown", topic, m.Note)] = None


def test_known_good_messages_go_out_in_c_and_to_the_log(
    sockets: tuple[zmq.Socket[Any], ...],
) -> None:
    pub, source, sink, reader = sockets
    loop = Loop(source, sink)
    allowed(loop)
    payloads = [note() for _ in range(3)]
    for payload in payloads:
        pub.send_multipart([b"event.coder", payload])
    assert loop.until(3) == 3
    assert loop.other == [] and loop.log == payloads
    assert [reader.recv_multipart() for _ in payloads] == [[b"event.coder", p] for p in payloads]


def test_every_message_not_known_good_goes_to_python_whole_and_in_order(
    sockets: tuple[zmq.Socket[Any], ...],
) -> None:
    pub, source, sink, reader = sockets
    loop = Loop(source, sink)
    allowed(loop)
    loop.verdicts[("unknown", "event.search", m.Note)] = ("violation", "not yours")
    long_topic = "event." + "x" * 200
    allowed(loop, long_topic)
    cases = [
        [b"event.coder", note(), b"extra"],  # three frames
        [b"event.coder"],  # one
        [b"event.coder", b"\xc1 not msgpack"],
        [b"event.coder", note() + b"\x00" * MAX_BYTES],  # over the limit
        [long_topic.encode(), note(long_topic)],  # a topic Python reports cut short
        [b"event.coder", note("event.other")],  # envelope topic differs
        [b"event.coder", note(sender="coder")],  # sender is not the identity
        [b"heartbeat.coder", note("heartbeat.coder")],  # no verdict cached yet
        [b"event.search", note("event.search")],  # a cached refusal
    ]
    good = note()
    for frames in [*cases[:4], [b"event.coder", good], *cases[4:]]:
        pub.send_multipart(frames)
    assert loop.until(len(cases) + 1) == 1
    assert loop.other == [("unknown", frames) for frames in cases]
    assert loop.log == [good]
    assert reader.recv_multipart() == [b"event.coder", good]
    assert not reader.poll(100)


def test_messages_come_with_the_curve_identity(data: DataDir, ctx: zmq.Context[Any]) -> None:
    auth = Authenticator(ctx, data.keys)
    auth.start()
    try:
        with (
            ctx.socket(zmq.PULL) as server,
            ctx.socket(zmq.PUSH) as client,
            ctx.socket(zmq.PAIR) as sink,
            ctx.socket(zmq.PAIR) as reader,
        ):
            curve_server(server, data.keys, "broker")
            endpoint = data.ipc("forward-test")
            server.bind(endpoint)
            curve_client(client, data.keys, "coder", load_public(data.keys, "broker"))
            client.connect(endpoint)
            sink.bind("inproc://forward-sink")
            reader.connect("inproc://forward-sink")
            loop = Loop(server, sink)
            loop.verdicts[("coder", "event.coder", m.Note)] = None
            coder_note = note(sender="coder")
            client.send_multipart([b"event.coder", coder_note])
            client.send_multipart([b"event.coder", note()])  # says "unknown", is coder
            assert loop.until(2) == 1
            assert loop.log == [coder_note]
            assert [identity for identity, _ in loop.other] == ["coder"]
    finally:
        auth.stop()


def test_nothing_waiting_returns_at_once(sockets: tuple[zmq.Socket[Any], ...]) -> None:
    started = time.monotonic()
    assert Loop(sockets[1], sockets[2]).run() == 0
    assert time.monotonic() - started < 1


def test_the_limit_leaves_the_rest_for_the_next_call(
    sockets: tuple[zmq.Socket[Any], ...],
) -> None:
    pub, source, sink, _ = sockets
    loop = Loop(source, sink)
    for i in range(5):
        pub.send_multipart([b"t", str(i).encode()])
    assert source.poll(5000)
    time.sleep(0.1)  # inproc: all five are queued once the first is
    loop.run(limit=2)
    assert [frames[1] for _, frames in loop.other] == [b"0", b"1"]
    loop.run()
    assert [frames[1] for _, frames in loop.other] == [b"0", b"1", b"2", b"3", b"4"]


def test_an_error_in_python_stops_the_batch_and_is_raised(
    sockets: tuple[zmq.Socket[Any], ...],
) -> None:
    pub, source, sink, _ = sockets
    loop = Loop(source, sink)

    def fail(identity: str, frames: list[bytes]) -> None:
        raise RuntimeError(f"refused {frames[1]!r}")

    loop.on_other = fail
    for i in range(3):
        pub.send_multipart([b"t", str(i).encode()])
    assert source.poll(5000)
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match="refused b'0'"):
        loop.run()
    loop.on_other = loop._record
    loop.run()
    assert [frames[1] for _, frames in loop.other] == [b"1", b"2"]  # nothing lost


def test_a_closed_socket_is_a_clear_error(sockets: tuple[zmq.Socket[Any], ...]) -> None:
    _, source, sink, _ = sockets
    sink.close()
    with pytest.raises(ValueError, match="closed socket"):
        Loop(source, sink).run()


def test_a_sink_that_would_block_is_an_error_not_a_hang(
    ctx: zmq.Context[Any], sockets: tuple[zmq.Socket[Any], ...]
) -> None:
    pub, source, _, _ = sockets
    with ctx.socket(zmq.PAIR) as lonely:  # no peer: a send would wait for one
        lonely.bind("inproc://forward-nobody")
        loop = Loop(source, lonely)
        allowed(loop)
        pub.send_multipart([b"event.coder", note()])
        source.poll(5000)
        with pytest.raises(OSError, match="send: Resource temporarily unavailable"):
            loop.run()


def test_a_socket_error_is_raised_not_swallowed(
    ctx: zmq.Context[Any], sockets: tuple[zmq.Socket[Any], ...]
) -> None:
    pub, source, _, _ = sockets
    with ctx.socket(zmq.SUB) as sub:  # a SUB socket cannot send
        loop = Loop(source, sub)
        allowed(loop)
        pub.send_multipart([b"event.coder", note()])
        source.poll(5000)
        with pytest.raises(OSError, match="send"):
            loop.run()
