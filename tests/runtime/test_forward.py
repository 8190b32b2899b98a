"""The broker's socket calls in C (runtime/_forward.c), on real sockets.

The broker tests run them end to end; these pin down what the broker relies on: whole
messages, the CURVE identity the ZAP handler set, the batch limit, never blocking.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from runtime import _forward
from runtime.auth import Authenticator
from runtime.keys import curve_client, curve_server, load_public
from runtime.paths import DataDir


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def pair(ctx: zmq.Context[Any]) -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    """Two connected PAIR sockets with no authentication."""
    with ctx.socket(zmq.PAIR) as a, ctx.socket(zmq.PAIR) as b:
        a.bind("inproc://forward-test")
        b.connect("inproc://forward-test")
        yield a, b


def receive_all(sock: zmq.Socket[Any], count: int) -> list[tuple[str, list[bytes]]]:
    got: list[tuple[str, list[bytes]]] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        sock.poll(100)
        got += _forward.receive(sock.underlying, 256)
    return got


def test_whole_messages_come_with_the_curve_identity(data: DataDir, ctx: zmq.Context[Any]) -> None:
    auth = Authenticator(ctx, data.keys)
    auth.start()
    try:
        with ctx.socket(zmq.PULL) as server, ctx.socket(zmq.PUSH) as client:
            curve_server(server, data.keys, "broker")
            endpoint = data.ipc("forward-test")
            server.bind(endpoint)
            curve_client(client, data.keys, "coder", load_public(data.keys, "broker"))
            client.connect(endpoint)
            messages = [[b"event.coder", b"payload"], [b"one frame"], [b"a", b"", b"c"]]
            for frames in messages:
                client.send_multipart(frames)
            assert receive_all(server, 3) == [("coder", frames) for frames in messages]
    finally:
        auth.stop()


def test_a_connection_with_no_zap_identity_is_unknown(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> None:
    a, b = pair
    a.send_multipart([b"t", b"p"])
    assert receive_all(b, 1) == [("unknown", [b"t", b"p"])]


def test_nothing_waiting_returns_at_once(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> None:
    started = time.monotonic()
    assert _forward.receive(pair[1].underlying, 256) == []
    assert time.monotonic() - started < 1


def test_the_limit_leaves_the_rest_for_the_next_call(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> None:
    a, b = pair
    for i in range(5):
        a.send_multipart([b"t", str(i).encode()])
    assert b.poll(5000)
    time.sleep(0.1)  # inproc: all five are queued once the first is
    first = _forward.receive(b.underlying, 2)
    rest = _forward.receive(b.underlying, 256)
    assert [frames[1] for _, frames in first] == [b"0", b"1"]
    assert [frames[1] for _, frames in rest] == [b"2", b"3", b"4"]


def test_send_puts_topic_and_payload_as_two_frames(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> None:
    a, b = pair
    big = bytes(range(256)) * 4096  # 1 MiB, the default message limit
    _forward.send(a.underlying, b"topic", big)
    _forward.send(a.underlying, memoryview(b"t2"), b"")
    assert b.recv_multipart() == [b"topic", big]
    assert b.recv_multipart() == [b"t2", b""]


def test_a_closed_socket_is_a_clear_error(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> None:
    a = pair[0]
    a.close()
    with pytest.raises(ValueError, match="closed socket"):
        _forward.send(a.underlying, b"t", b"p")
    with pytest.raises(ValueError, match="closed socket"):
        _forward.receive(a.underlying, 1)


def test_a_socket_that_would_block_is_an_error_not_a_hang(ctx: zmq.Context[Any]) -> None:
    with ctx.socket(zmq.PAIR) as lonely:  # no peer: a blocking send would wait for one
        lonely.bind("inproc://forward-nobody")
        with pytest.raises(OSError, match="send: Resource temporarily unavailable"):
            _forward.send(lonely.underlying, b"t", b"p")


def test_a_socket_error_is_raised_not_swallowed(ctx: zmq.Context[Any]) -> None:
    with ctx.socket(zmq.SUB) as sub, pytest.raises(OSError, match="send"):
        _forward.send(sub.underlying, b"t", b"p")  # a SUB socket cannot send
