"""The ACL on every topic, fuzzed through a real broker.

Random identities (every one Chorus knows, and a stranger) publish random topics with
well-formed, spoofed, malformed, truncated, bit-flipped, oversized, deeply nested and
wrongly framed payloads. A monitor subscribed to everything must see exactly the
messages the ACL allows, each from an identity allowed to send it, and for every other
message one report (``sys.violation`` or ``sys.rejected``) naming the publisher; the
broker must still run at the end. 10,000 messages by default, 100,000 under ``slow``.

Flow control, not timing: messages go in batches, and each publisher ends its batch
with a sentinel (a topic nobody may publish, so it comes back as a violation naming
it); a publisher's messages are handled in order, so once every sentinel of a batch is
back, every message of the batch has been decided and seen."""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import zmq

from runtime import acl
from runtime import messages as m
from runtime.keys import curve_client
from runtime.paths import DataDir
from tests.conftest import BrokerProcess
from tests.runtime.test_messages import SAMPLES

MAX_BYTES = 4096  # the broker's --max-bytes here, so that oversized messages are cheap
BATCH = 2000  # messages in flight at most: far below every high-water mark on the way
SENTINEL = "fuzz.sentinel."
FORWARD, VIOLATION, REJECTED = "forward", "violation", "rejected"

# who alone may put something on the topics that matter most, written out here rather
# than taken from runtime.acl, as a second opinion on what the broker forwards
ONLY: dict[str, frozenset[str]] = {
    "user.in": frozenset({"client"}),
    "user.out": frozenset({"narrator"}),
    "shadow.user.out": frozenset({"narrator-shadow"}),
    "narrator.cue": frozenset({"controller"}),
    "sys.config": frozenset({"operator"}),
    "engine.stats": frozenset({"engine"}),
    "task.update": frozenset({"coder", "search", "rag"}),
}


def legal_looking_topics() -> list[str]:
    names = [*acl.IDENTITIES, "nobody"]
    return [
        "user.in",
        "user.out",
        "shadow.user.out",
        "task.update",
        "narrator.cue",
        "narrator.decision",
        "engine.stats",
        "sys.config",
        "sys.ping",
        "sys.rejected",
        "sys.violation",
        "sys.restart",
        "sys.started",
        *(f"task.assign.{n}" for n in names),
        *(f"event.{n}" for n in names),
        *(f"heartbeat.{n}" for n in names),
        *(f"ack.{n}" for n in names),
    ]


ODD_TOPICS = [
    "",
    "user",
    "user.",
    "user.out.",
    "user.out.x",
    "user.outx",
    "USER.OUT",
    " user.out",
    "user.out\x00",
    "user.out\ufffd",
    "task.assign",
    "task.assign.",
    "task.assign.coder.x",
    "event",
    "event.",
    "event.coder.x",
    "sys",
    "sys.",
    "sys.a.b",
    "ack",
    "ack.",
    "narrator.cue.x",
    "héllo.wörld",
    "x" * 300,
    "user.out" + "x" * 300,
]


@dataclass
class Sent:
    """What one publisher sent and what the oracle expects of each message."""

    forward: set[str] = field(default_factory=set)  # envelope ids the ACL lets through
    reports: collections.Counter[str] = field(default_factory=collections.Counter)


def expected(identity: str, frames: list[bytes]) -> tuple[str, m.Envelope | None]:
    """What the broker must do with ``frames`` from ``identity``, and the envelope."""
    if len(frames) != 2 or len(frames[1]) > MAX_BYTES:
        return REJECTED, None
    try:
        envelope = m.decode(frames[1])
    except msgspec.DecodeError:
        return REJECTED, None
    if envelope.topic.encode() != frames[0] or len(envelope.topic) > 200:
        return REJECTED, envelope
    if envelope.sender != identity or acl.publish_violation(identity, envelope.topic):
        return VIOLATION, envelope
    if acl.body_mismatch(envelope.topic, envelope.body):
        return REJECTED, envelope
    return FORWARD, envelope


class Fuzzer:
    """Makes random messages; every envelope id it mints starts with ``fuzz-``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.topics = legal_looking_topics()
        # what each identity may publish, so that a good share of the traffic is allowed
        self.allowed = {
            who: [
                (topic, body)
                for topic in self.topics
                for body in SAMPLES
                if not acl.publish_violation(who, topic) and not acl.body_mismatch(topic, body)
            ]
            for who in acl.IDENTITIES
        }
        self.ids = 0
        self.used: set[str] = set()

    def text(self) -> str:
        alphabet = "ab \n\"'<>{}\\\x00é東🙂"
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randrange(12)))

    def body(self) -> m.Body:
        body = self.rng.choice(SAMPLES)
        match body:
            case m.Chunk():
                return msgspec.structs.replace(body, delta=self.text())
            case m.UserTurn():
                return m.UserTurn(text=self.text())
            case m.Note():
                return m.Note(name=self.text(), data={self.text(): self.rng.random()})
        return body

    def envelope(self, identity: str) -> m.Envelope:
        self.ids += 1
        rng = self.rng
        body = self.body()
        if self.allowed[identity] and rng.random() < 0.4:
            topic, body = rng.choice(self.allowed[identity])
        else:
            topic = rng.choice(self.topics) if rng.random() < 0.8 else rng.choice(ODD_TOPICS)
        sender = identity if rng.random() < 0.8 else rng.choice([*acl.IDENTITIES, "", "root"])
        return m.Envelope(
            id=f"fuzz-{self.ids}",
            topic=topic,
            sender=sender,
            ts=time.time(),
            seq=self.ids,
            body=body,  # type: ignore[arg-type]
            conversation=rng.choice([None, "c1", self.text()]),
        )

    def frames(self, identity: str) -> list[bytes]:
        """One random message: well formed or broken in one of several ways."""
        rng = self.rng
        env = self.envelope(identity)
        raw = m.encode(env)
        topic = env.topic.encode()
        kind = rng.random()
        if kind < 0.55:
            return [topic, raw]
        if kind < 0.60:  # the frame says one topic, the envelope another
            return [rng.choice(self.topics).encode(), raw]
        if kind < 0.65:
            return [topic + b"\xff\xfe", raw]  # not UTF-8
        if kind < 0.70:
            return [topic, rng.randbytes(rng.randrange(64))]
        if kind < 0.75:
            return [topic, raw[: rng.randrange(len(raw))]]
        if kind < 0.82:
            flipped = bytearray(raw)
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            return [topic, bytes(flipped)]
        if kind < 0.88:
            return [topic, msgspec.msgpack.encode(self.misshapen(env))]
        if kind < 0.90:  # nested past msgspec's recursion limit: must not crash the broker
            depth = rng.randrange(1000, 3000)
            extra = msgspec.msgpack.encode("deep") + b"\x91" * depth + b"\xc0"
            return [topic, bytes([raw[0] + 1]) + raw[1:] + extra]
        if kind < 0.92:
            note = msgspec.structs.replace(env, body=m.Note(name="big", data={"pad": "x" * 5000}))
            return [topic, m.encode(note)]
        if kind < 0.96:
            return [topic]
        return [topic, raw, raw]

    def misshapen(self, env: m.Envelope) -> Any:
        """The envelope as plain msgpack data with one thing wrong."""
        data = msgspec.to_builtins(env)
        rng = self.rng
        field_name = rng.choice(list(data))
        match rng.randrange(6):
            case 0:
                del data[field_name]
            case 1:
                data[field_name] = rng.choice([1, -1.5, None, [], {}, "x", b"\x00", True])
            case 2:
                data["body"] = {"type": rng.choice(["Nope", "", "Envelope", "Body"])}
            case 3:
                data["body"] = rng.choice([[], "UserTurn", 7, None])
            case 4:
                data["unexpected"] = {"a": [1, 2, {"b": None}]}
            case _:
                return [data[k] for k in data]
        return data

    def fresh(self, identity: str, frames: list[bytes]) -> tuple[str, m.Envelope | None]:
        """The oracle's verdict; a forwarded envelope must carry a new ``fuzz-`` id (a
        flipped byte may have changed it) so that what the monitor sees can be matched."""
        verdict, env = expected(identity, frames)
        if verdict == FORWARD:
            assert env is not None
            if not env.id.startswith("fuzz-") or env.id in self.used:
                return "skip", env
            self.used.add(env.id)
        return verdict, env


class Monitor:
    """A raw ``monitor`` subscriber to everything: what was forwarded, and the reports."""

    def __init__(self, ctx: zmq.Context[Any], data: DataDir) -> None:
        ep = data.read_endpoints()
        self.sock = ctx.socket(zmq.SUB)
        self.sock.rcvhwm = 0
        curve_client(self.sock, data.keys, "monitor", ep.broker_public_key.encode())
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(ep.sub)
        self.forwarded: dict[str, str] = {}  # id -> topic, for the fuzz's envelopes
        self.reports: collections.Counter[tuple[str, str]] = collections.Counter()
        self.sentinels: set[tuple[str, int]] = set()
        self.smuggled: list[str] = []  # forwarded with a frame topic other than its own

    def read(self, timeout_ms: int) -> bool:
        if not self.sock.poll(timeout_ms):
            return False
        while True:
            try:
                topic, payload = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            env = m.decode(payload)
            if env.id.startswith("fuzz-"):
                assert env.id not in self.forwarded, f"{env.id} forwarded twice"
                self.forwarded[env.id] = env.topic
                if topic != env.topic.encode():
                    self.smuggled.append(env.id)
                continue
            match env.body:
                case m.Violation(identity=who, topic=t) if t.startswith(SENTINEL):
                    self.sentinels.add((who, int(t.removeprefix(SENTINEL))))
                case m.Violation(identity=who):
                    self.reports[(who, VIOLATION)] += 1
                case m.Rejected(sender=who):
                    self.reports[(who, REJECTED)] += 1

    def wait_for(self, wanted: set[tuple[str, int]], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not wanted <= self.sentinels:
            assert time.monotonic() < deadline, f"missing sentinels {wanted - self.sentinels}"
            self.read(100)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def publishers(ctx: zmq.Context[Any], data: DataDir) -> dict[str, zmq.Socket[Any]]:
    ep = data.read_endpoints()
    socks = {}
    for identity in acl.IDENTITIES:
        sock = ctx.socket(zmq.PUB)
        sock.sndhwm = 0  # never drop on our side: the batches bound what is in flight
        curve_client(sock, data.keys, identity, ep.broker_public_key.encode())
        sock.connect(ep.pub)
        socks[identity] = sock
    return socks


def sentinel(identity: str, batch: int) -> list[bytes]:
    topic = f"{SENTINEL}{batch}"
    return [topic.encode(), m.encode(m.Stamper(identity).stamp(topic, m.Note(name="end")))]


def fuzz(data: DataDir, broker: BrokerProcess, ctx: zmq.Context[Any], count: int) -> None:
    monitor = Monitor(ctx, data)
    socks = publishers(ctx, data)
    stranger = ctx.socket(zmq.PUB)
    try:
        stranger.curve_publickey, stranger.curve_secretkey = zmq.curve_keypair()
        stranger.curve_serverkey = data.read_endpoints().broker_public_key.encode()
        stranger.connect(data.read_endpoints().pub)
        run(broker, monitor, socks, stranger, count)
    finally:
        for sock in (monitor.sock, stranger, *socks.values()):
            sock.close(linger=0)


def run(
    broker: BrokerProcess,
    monitor: Monitor,
    socks: dict[str, zmq.Socket[Any]],
    stranger: zmq.Socket[Any],
    count: int,
) -> None:
    everyone = {(who, -1) for who in socks}
    while not everyone <= monitor.sentinels:  # every publisher and the monitor are through
        for who, sock in socks.items():
            sock.send_multipart(sentinel(who, -1))
        monitor.read(100)

    fuzzer = Fuzzer(seed=count)
    sent = {who: Sent() for who in socks}
    identities = list(socks)
    made = 0
    for batch in range(0, (count + BATCH - 1) // BATCH):
        for _ in range(min(BATCH, count - made)):
            who = fuzzer.rng.choice(identities)
            frames = fuzzer.frames(who)
            verdict, env = fuzzer.fresh(who, frames)
            if verdict == "skip":
                continue
            made += 1
            if verdict == FORWARD:
                assert env is not None
                sent[who].forward.add(env.id)
            else:
                sent[who].reports[verdict] += 1
            socks[who].send_multipart(frames)
            if fuzzer.rng.random() < 0.01:  # a stranger's key never gets a message through
                stranger.send_multipart(fuzzer.frames("client"))
        for who, sock in socks.items():
            sock.send_multipart(sentinel(who, batch))
        monitor.wait_for({(who, batch) for who in socks})
        assert broker.proc is not None and broker.proc.poll() is None, "the broker died"

    allowed = {i for s in sent.values() for i in s.forward}
    let_through = set(monitor.forwarded) - allowed
    assert not let_through, f"forwarded against the ACL: {sorted(let_through)[:10]}"
    assert set(monitor.forwarded) == allowed, "an allowed message was not forwarded"
    assert not monitor.smuggled
    for who, s in sent.items():
        for env_id in s.forward:  # a second opinion on the topics that matter most
            topic = monitor.forwarded[env_id]
            assert who in ONLY.get(topic, {who}), f"{who} got {topic} through"
            assert who != "monitor"
        for verdict in (VIOLATION, REJECTED):
            assert monitor.reports[(who, verdict)] == s.reports[verdict], (who, verdict)
    assert not any(who not in socks for who, _ in monitor.reports), monitor.reports
    # the run was a real mix, not all of one kind
    total_forwarded = len(allowed)
    assert total_forwarded > count // 20
    assert sum(monitor.reports.values()) > count // 2
    assert any(t == "user.out" for t in monitor.forwarded.values())


@pytest.mark.parametrize(
    "count",
    [10_000, pytest.param(100_000, marks=[pytest.mark.slow, pytest.mark.timeout(600)])],
    ids=["10k", "100k"],
)
def test_acl_fuzz_through_a_real_broker(data: DataDir, ctx: zmq.Context[Any], count: int) -> None:
    broker = BrokerProcess(data, "--max-bytes", str(MAX_BYTES))
    broker.start()
    try:
        fuzz(data, broker, ctx, count)
    finally:
        assert broker.stop() == 0
