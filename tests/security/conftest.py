"""Fixtures for the security checks: a real engine on a tiny random model (its socket is
what matters here, not its answers); a handshake probe that reports what ZeroMQ's CURVE
handshake decided rather than waiting to see whether a message comes through; and one
running instance with a real gateway in front of it, shared by this package's tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import zmq
from transformers import PreTrainedTokenizerFast
from zmq.utils.monitor import recv_monitor_message

from engine.server import EngineConfig, EngineServer
from runtime.acl import WORKERS
from runtime.keys import ensure_keys
from runtime.paths import DataDir
from tests.engine.conftest import serving_tiny, tiny_tokenizer  # noqa: F401 (a fixture)
from tests.gateway.conftest import Gateway, Instance

HANDSHAKE_ENDS = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "succeeded",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",  # ZAP said no: an unknown or unwanted key
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed",  # e.g. no CURVE against a CURVE server
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
}


@pytest.fixture
def engine(data: DataDir, tiny_tokenizer: PreTrainedTokenizerFast) -> Iterator[EngineServer]:  # noqa: F811
    """The real engine server (its ROUTER socket, ZAP handler and loop) on a tiny model."""
    config = EngineConfig(sink=2, window=30, idle_s=60, max_append_tokens=400)
    with serving_tiny(data, tiny_tokenizer, config) as server:
        yield server


@dataclass(frozen=True)
class Handshake:
    """How a connection attempt ended: ``succeeded``, ``refused`` (the server's ZAP
    handler turned the key down) or ``failed`` (the mechanisms did not agree)."""

    outcome: str
    detail: int


def handshake(
    kind: int,
    endpoint: str,
    *,
    server_key: bytes | None,
    public: bytes | None = None,
    secret: bytes | None = None,
    timeout: float = 10,
) -> Handshake:
    """Connect a ``kind`` socket to ``endpoint`` as a CURVE client with this keypair (or
    with no security at all when ``server_key`` is None) and return how the handshake
    ended, as the client's socket monitor reports it."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(kind)
    try:
        if server_key is not None:
            assert public is not None and secret is not None
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = server_key
        monitor = sock.get_monitor_socket()
        sock.connect(endpoint)
        try:
            while monitor.poll(int(timeout * 1000)):
                event = recv_monitor_message(monitor)
                if event["event"] in HANDSHAKE_ENDS:
                    return Handshake(HANDSHAKE_ENDS[event["event"]], int(event["value"]))
            raise TimeoutError(f"no handshake with {endpoint} ended within {timeout} s")
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
    finally:
        sock.close(linger=0)
        ctx.term()


@dataclass(frozen=True)
class Served:
    """A running instance and the real ``python -m runtime serve`` gateway in front of it."""

    data: DataDir
    gateway: Gateway


@pytest.fixture(scope="package")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One instance for the gateway and privacy checks: echo agents, the real controller
    and narrator, no engine (the narrator answers with the engine-down notice), the bus
    log in ``--log-redact`` mode; and a gateway in front of it."""
    data = DataDir(tmp_path_factory.mktemp("security") / "data")
    data.ensure()
    ensure_keys(data.keys)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CHORUS_LOG_REDACT", "true")  # the broker child reads it
        instance = Instance(data)
    try:
        gateway = Gateway.start(data)
        try:
            anyio.run(gateway.wait_connected, WORKERS)
            yield Served(data, gateway)
        finally:
            assert gateway.stop() == 0
    finally:
        instance.stop()
