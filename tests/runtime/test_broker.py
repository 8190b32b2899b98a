"""A real broker process: forwarding, the ACL, bad input, and what it writes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import anyio
import msgspec
import psutil
import pytest
import zmq
import zmq.asyncio

from orchestrator.log.layout import hour_file_name
from runtime import messages as m
from runtime.broker import check_bind
from runtime.bus import Bus, Subscription
from runtime.errors import ConfigError
from runtime.keys import curve_client
from runtime.paths import DataDir
from tests.conftest import BrokerProcess
from tests.runtime.test_messages import SAMPLES

# one legal (identity, topic) for each body type
LEGAL: dict[type[m.Body], tuple[str, str]] = {
    m.UserTurn: ("client", "user.in"),
    m.Chunk: ("narrator", "user.out"),
    m.TaskAssign: ("controller", "task.assign.coder"),
    m.TaskCancel: ("controller", "task.assign.coder"),
    m.TaskUpdate: ("coder", "task.update"),
    m.Cue: ("controller", "narrator.cue"),
    m.Decision: ("controller", "narrator.decision"),
    m.Heartbeat: ("coder", "heartbeat.coder"),
    m.EngineStats: ("engine", "engine.stats"),
    m.ConfigChange: ("operator", "sys.config"),
    m.Ack: ("coder", "ack.controller"),
    m.Ping: ("supervisor", "sys.ping"),
    m.Rejected: ("supervisor", "sys.rejected"),
    m.Violation: ("supervisor", "sys.violation"),
    m.ProcessEvent: ("supervisor", "sys.restart"),
    m.Fault: ("coder", "event.coder"),
    m.Rollout: ("narrator", "event.narrator"),
    m.Note: ("coder", "event.coder"),
}


async def settle() -> None:
    """Let new subscriptions reach the broker (pub/sub gives no receipt for them)."""
    await anyio.sleep(0.3)


async def next_matching(
    sub: Subscription, pred: Callable[[m.Envelope], bool], timeout: float = 5
) -> m.Envelope:
    with anyio.fail_after(timeout):
        async for env in sub:
            if pred(env):
                return env
    raise AssertionError("subscription ended")


async def nothing_matching(
    sub: Subscription, pred: Callable[[m.Envelope], bool], wait: float = 0.5
) -> None:
    with anyio.move_on_after(wait):
        async for env in sub:
            assert not pred(env), f"unexpected {env}"


async def test_every_body_type_round_trips_through_the_broker(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    async with Bus("monitor", ep, data.keys) as mon:
        everything = mon.subscribe("")
        await settle()
        for body in SAMPLES:
            identity, topic = LEGAL[type(body)]
            async with Bus(identity, ep, data.keys) as bus:
                sent = await bus.publish(topic, body, conversation="c1")
                got = await next_matching(everything, lambda e, i=sent.id: e.id == i)
                assert got == sent


@pytest.mark.parametrize(
    ("identity", "topic", "body"),
    [
        ("coder", "user.out", m.Chunk(stream="s", seq=0, delta="I am not the narrator")),
        ("controller", "user.out", m.Chunk(stream="s", seq=0, delta="nor am I")),
        ("client", "task.assign.coder", m.TaskAssign(task="t", kind="k", text="x")),
        ("coder", "sys.config", m.ConfigChange(key="k", value="v")),
        ("coder", "heartbeat.rag", m.Heartbeat(state="idle")),
    ],
)
async def test_acl_violations_are_dropped_and_reported(
    data: DataDir, broker: BrokerProcess, identity: str, topic: str, body: m.Body
) -> None:
    ep = data.read_endpoints()
    async with Bus("monitor", ep, data.keys) as mon, Bus(identity, ep, data.keys) as bad:
        everything = mon.subscribe("")
        await settle()
        sent = await bad.publish(topic, body)
        report = await next_matching(everything, lambda e: e.topic == "sys.violation")
        assert isinstance(report.body, m.Violation)
        assert report.body.identity == identity and report.body.topic == topic
        assert report.sender == "broker"
        await nothing_matching(everything, lambda e: e.id == sent.id)


async def test_spoofed_sender_is_a_violation(data: DataDir, broker: BrokerProcess) -> None:
    ep = data.read_endpoints()
    spoof = m.Stamper("narrator").stamp("user.out", m.Chunk(stream="s", seq=0, delta="spoof"))
    async with Bus("monitor", ep, data.keys) as mon, Bus("coder", ep, data.keys) as coder:
        everything = mon.subscribe("")
        await settle()
        assert coder._pub is not None
        await coder._pub.send_multipart([b"user.out", m.encode(spoof)])
        report = await next_matching(everything, lambda e: e.topic == "sys.violation")
        assert isinstance(report.body, m.Violation)
        assert "not the authenticated identity" in report.body.reason
        await nothing_matching(everything, lambda e: e.id == spoof.id)


async def test_monitor_may_not_publish(data: DataDir, broker: BrokerProcess) -> None:
    ep = data.read_endpoints()
    note = m.Stamper("monitor").stamp("event.coder", m.Note(name="x"))
    async with Bus("monitor", ep, data.keys) as mon:
        everything = mon.subscribe("")
        await settle()
        assert mon._pub is not None
        await mon._pub.send_multipart([b"event.coder", m.encode(note)])
        report = await next_matching(everything, lambda e: e.topic == "sys.violation")
        assert isinstance(report.body, m.Violation) and report.body.identity == "monitor"


async def test_worker_cannot_subscribe_to_user_in(data: DataDir, broker: BrokerProcess) -> None:
    ep = data.read_endpoints()
    async with (
        Bus("monitor", ep, data.keys) as mon,
        Bus("coder", ep, data.keys) as coder,
        Bus("client", ep, data.keys) as client,
    ):
        everything = mon.subscribe("")
        await settle()
        snoop = coder.subscribe("user.in")
        await settle()
        report = await next_matching(everything, lambda e: e.topic == "sys.violation")
        assert isinstance(report.body, m.Violation) and "may not subscribe" in report.body.reason
        await client.publish("user.in", m.UserTurn(text="secret"))
        await nothing_matching(snoop, lambda e: True)


async def test_unknown_key_is_refused_at_the_handshake(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    public, secret = zmq.curve_keypair()
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.curve_publickey, sub.curve_secretkey, sub.curve_serverkey = (
        public,
        secret,
        ep.broker_public_key.encode(),
    )
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ep.sub)
    try:
        async with Bus("client", ep, data.keys) as client:
            for _ in range(5):
                await client.publish("user.in", m.UserTurn(text="hi"))
            with anyio.move_on_after(1.0) as scope:
                await sub.recv_multipart()
            assert scope.cancelled_caught, "a stranger's key received traffic"
    finally:
        sub.close(linger=0)
        ctx.term()


def _raw_pub(
    data: DataDir, identity: str
) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]]:
    ep = data.read_endpoints()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    curve_client(pub, data.keys, identity, ep.broker_public_key.encode())
    pub.connect(ep.pub)
    return ctx, pub


async def test_malformed_and_oversized_input_is_rejected_without_harming_traffic(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    ctx, raw = _raw_pub(data, "coder")
    stamper = m.Stamper("coder")
    bad_inputs: list[tuple[list[bytes], str]] = [
        ([b"event.coder", b"\xc1\xff garbage"], "does not decode"),
        ([b"event.coder"], "expected 2 frames"),
        ([b"event.coder", b"a", b"b"], "expected 2 frames"),
        (
            [
                b"event.coder",
                m.encode(stamper.stamp("task.update", m.TaskUpdate(task="t", state="accepted"))),
            ],
            "differs from frame topic",
        ),
        (
            [b"event.coder", m.encode(stamper.stamp("event.coder", m.UserTurn(text="x")))],
            "carries Fault, Note",
        ),
        (
            [
                b"event.coder",
                m.encode(
                    stamper.stamp("event.coder", m.Note(name="big", data={"pad": "x" * (1 << 20)}))
                ),
            ],
            "exceeds",
        ),
    ]
    try:
        async with Bus("monitor", ep, data.keys) as mon, Bus("coder", ep, data.keys) as good:
            everything = mon.subscribe("")
            await settle()
            await anyio.sleep(0.3)  # the raw socket's handshake
            for frames, reason in bad_inputs:
                raw.send_multipart(frames)
                report = await next_matching(everything, lambda e: e.topic == "sys.rejected")
                assert isinstance(report.body, m.Rejected)
                assert report.body.sender == "coder"
                assert reason in report.body.reason
                ok = await good.publish("event.coder", m.Note(name="still fine"))
                await next_matching(everything, lambda e, i=ok.id: e.id == i)
    finally:
        raw.close(linger=0)
        ctx.term()
    assert broker.proc is not None and broker.proc.poll() is None, "the broker died on bad input"


def test_endpoints_file_names_everything_a_monitor_needs(
    data: DataDir, broker: BrokerProcess
) -> None:
    raw = json.loads(data.endpoints_file.read_text())
    assert set(raw) == {"pub", "sub", "engine", "broker_public_key", "max_bytes"}
    assert raw["pub"].startswith("ipc://") and raw["sub"].startswith("ipc://")
    assert len(raw["broker_public_key"]) == 40


def test_long_ipc_paths_fall_back_to_a_short_dir(tmp_path: object) -> None:
    from pathlib import Path

    deep = DataDir(Path(str(tmp_path)) / ("x" * 60) / ("y" * 60))
    deep.ensure()
    endpoint = deep.ipc("pub")
    assert len(endpoint.removeprefix("ipc://")) <= 103
    assert str(deep.root) not in endpoint


def test_non_loopback_bind_needs_allow_remote() -> None:
    check_bind("tcp://127.0.0.1:5555", allow_remote=False)
    with pytest.raises(ConfigError, match="--allow-remote"):
        check_bind("tcp://0.0.0.0:5555", allow_remote=False)
    check_bind("tcp://0.0.0.0:5555", allow_remote=True)


async def test_tcp_broker_on_loopback(data: DataDir) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = BrokerProcess(data, "--bind", f"tcp://127.0.0.1:{port}")
    ep = b.start()
    try:
        assert ep.pub == f"tcp://127.0.0.1:{port}" and ep.sub == f"tcp://127.0.0.1:{port + 1}"
        async with Bus("client", ep, data.keys) as client:
            await client.publish("user.in", m.UserTurn(text="over tcp"))
    finally:
        assert b.stop() == 0


async def test_accepted_envelopes_reach_the_log_and_shutdown_is_clean(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    async with Bus("coder", ep, data.keys) as coder:
        sent = await coder.publish("event.coder", m.Note(name="logged"))
    deadline = time.monotonic() + 5
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        lines = [
            json.loads(line)
            for f in data.logs.glob("*.jsonl")
            for line in f.read_text().splitlines()
        ]
        if any(line["id"] == sent.id for line in lines):
            break
        await anyio.sleep(0.1)
    entry = next(line for line in lines if line["id"] == sent.id)
    assert entry["topic"] == "event.coder" and entry["sender"] == "coder"
    assert msgspec.convert(entry["body"], m.Note).name == "logged"
    assert broker.stop() == 0
    assert not data.endpoints_file.exists()
    assert not list(data.socket_dir().glob("*.sock"))


async def test_a_log_that_cannot_be_written_is_reported_as_a_storage_fault(data: DataDir) -> None:
    data.logs.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for ts in (now, now + 3600):  # this hour's file and the next are full disks
        (data.logs / hour_file_name(ts)).symlink_to("/dev/full")
    b = BrokerProcess(data)
    endpoints = b.start()
    try:
        async with (
            Bus("monitor", endpoints, data.keys) as monitor,
            Bus("operator", endpoints, data.keys) as operator,
        ):
            with monitor.subscribe("event.broker") as faults:
                await settle()
                await operator.publish("sys.config", m.ConfigChange(key="idle_s", value="5"))
                env = await next_matching(faults, lambda e: isinstance(e.body, m.Fault))
            assert env.sender == "broker" and isinstance(env.body, m.Fault)
            assert env.body.kind == "storage_error"
            assert "No space left on device" in env.body.message
            # a subscriber that arrives while the log still fails hears it at once
            async with Bus("controller", endpoints, data.keys) as late:
                with late.subscribe("event.") as again:
                    env = await next_matching(again, lambda e: isinstance(e.body, m.Fault))
            assert isinstance(env.body, m.Fault) and env.body.kind == "storage_error"
            # and the broker goes on forwarding
            with monitor.subscribe("sys.config") as configs:
                await settle()
                await operator.publish("sys.config", m.ConfigChange(key="idle_s", value="6"))
                await next_matching(configs, lambda e: e.topic == "sys.config")
    finally:
        assert b.stop() == 0


def logged_ids(data: DataDir) -> set[str]:
    return {
        json.loads(line)["id"]
        for f in data.logs.glob("*.jsonl")
        for line in f.read_text().splitlines()
        if line.strip()
    }


async def test_the_log_writer_has_its_own_process_and_is_restarted_if_it_dies(
    data: DataDir, broker: BrokerProcess
) -> None:
    assert broker.proc is not None
    [writer] = [
        p
        for p in psutil.Process(broker.proc.pid).children()
        if "orchestrator.log.process" in " ".join(p.cmdline())
    ]
    # below every ordinary task, and so are the threads it started (I/O, writer)
    threads = [t.id for t in writer.threads()]
    assert len(threads) >= 3
    assert all(os.sched_getscheduler(tid) == os.SCHED_IDLE for tid in threads)
    assert os.sched_getscheduler(broker.proc.pid) == os.SCHED_OTHER
    ep = data.read_endpoints()
    async with Bus("monitor", ep, data.keys) as mon, Bus("coder", ep, data.keys) as coder:
        with mon.subscribe("event.") as events:
            await settle()
            writer.kill()
            env = await next_matching(events, lambda e: isinstance(e.body, m.Fault), timeout=15)
            assert env.sender == "broker" and isinstance(env.body, m.Fault)
            assert env.body.kind == "storage_error" and "restarted" in env.body.message
            sent = await coder.publish("event.coder", m.Note(name="after the restart"))
            await next_matching(events, lambda e: e.id == sent.id)  # still forwarding
    with anyio.fail_after(10):
        while sent.id not in logged_ids(data):  # noqa: ASYNC110
            await anyio.sleep(0.1)
