"""Bus throughput and latency: direct PUB→SUB against the broker (CURVE + ACL checks).

Run (from the repository root)::

    .venv/bin/python -m benchmarks.bus            # full: writes benchmarks/results/bus.{json,png}
    .venv/bin/python -m benchmarks.bus --quick    # ~1 min: writes benchmarks/results/quick/

Wall time on the 2-core development VM (AMD EPYC), with other work raising the load
average to 3-8: full ~240 s, quick 40-90 s (before the sustained search: 94-145 s and
30-115 s). Figures vary a lot with that load; compare
runs by ``cpu_us_per_msg`` and ``cpu_bound_ratio`` rather than by raw rates.

Every party is its own process, as in a real deployment: the broker
(:class:`runtime.broker.Broker`, with its ZAP handler, ACL checks and log writer), each
publisher, and the subscriber. Both paths use CURVE on ``ipc://``, the same envelopes
(``runtime.messages.Note`` on ``event.coder``, stamped and encoded per message as
``Bus.publish`` does) and the same publisher count:

* direct: the subscriber binds a SUB socket as a CURVE server and the publishers connect
  their PUB sockets to it;
* broker: publishers (identity ``coder``) connect to the broker's XSUB side and the
  subscriber (identity ``monitor``) to its XPUB side.

Throughput, flat out: each publisher sends its share as fast as it can; ``XPUB_NODROP``
makes a full pipe block the sender instead of dropping, so the publishers are paced by
whatever is slowest. The subscriber only counts frames (the same work on both paths) and
times the first to the last message it received; anything not received is reported as
dropped (on the broker path the broker's XPUB drops for a subscriber that falls
``sndhwm`` behind, by design). Each configuration runs ``rounds`` times, direct and broker
back to back, and the best round counts: load from elsewhere only ever slows a run down.

Flat out is not a fair race for a lossy fan-out: on the direct path the subscriber's
full pipe holds the publishers back, while on the broker path nothing does (the broker
drops for the subscriber instead of blocking), so unpaced publishers take the cores, the
starved subscriber falls behind and most messages are dropped, and a *slower* broker
scores higher. The headline throughput is therefore the sustained rate, for 64 B bodies
and 8 publishers: the publishers share an offered rate on an absolute schedule (waking
at most every millisecond and sending what is due), starting at 20k msg/s and rising
×1.5 until a rate fails, then two bisections of the gap. A rate holds when under 1% is
lost and both the publishers' sending and the subscriber's receiving (first to last
arrival) reach 95% of it; the figure is the delivered rate at the highest rate that
held. Direct and broker run back to back, once per round; the best round counts.

Latency: one publisher sends on an open-loop schedule of 10k msg/s (absolute schedule;
it sleeps between sends and never waits for the bus); the subscriber decodes each
envelope and records arrival minus the moment of sending (``time.monotonic_ns``, one
clock for every process on the machine). How late the publisher itself was against its
schedule is recorded too: when that is large, the machine was short of CPU. Each round
runs three paths back to back: direct, the broker, and libzmq's own C forwarding loop
(``zmq.proxy``) with CURVE on both hops and nothing checked or logged (``proxy``): the
floor under any CURVE broker on this machine, so that a missed p99 says whether the
broker's own work or the machine bounds it. The round with the lowest p99 counts for
each path (interference only ever adds latency); every round is in the JSON.

The headline keys: ``ratio`` is broker ÷ direct sustained throughput for 64 B bodies
and 8 publishers (``flat_out_ratio`` the same from the flat-out runs, with the share the
broker path dropped); ``p50_us``/``p99_us`` are the broker path's latencies. "64 B body" means the
msgpack encoding of the ``Note`` body is 64 bytes; the envelope around it adds ~100 more.
The CPU time each party spends per message is recorded as well; on 2 cores their sum is
what bounds throughput, and ``cpu_bound_ratio`` (direct ÷ broker, summed over all
parties) is the ratio saturated cores would give, less at the mercy of other load than
the measured rates.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import numpy as np
import structlog
import zmq
import zmq.auth
import zmq.auth.thread

from runtime import messages as m
from runtime.keys import curve_client, curve_server, ensure_keys, load_public
from runtime.paths import DataDir

from ._common import percentile, save_plot, write_json

if TYPE_CHECKING:  # matplotlib is slow to import and the child processes never draw
    from matplotlib.figure import Figure

BODY_SIZES = (64, 4096)
PUBLISHER_COUNTS = (1, 8)
HEADLINE = (64, 8)  # (body bytes, publishers) behind ``ratio``
LATENCY_RATE = 10_000  # msg/s, open loop, one publisher
LATENCY_BODY = 64
LATENCY_SKIP = 500  # first samples left out: the first pass through cold code paths
TOPIC = "event.coder"
WARMUP_TOPIC = "heartbeat.coder"  # handshakes happen on these, before the clock starts
PUBLISHER = "coder"  # the ACL is per identity, so all publishers share it
SUBSCRIBER = "monitor"
HWM = 10_000  # what Bus uses
IDLE_END_MS = 2_000  # the subscriber stops this long after the last message
START_TIMEOUT_S = 60.0
TARGET_RATIO = 0.4
TARGET_P99_US = 2_000.0
# the sustained rate: the highest offered rate a path delivers with under 1% lost, the
# publishers keeping at least 95% of their schedule and the subscriber receiving at least
# 95% of the offered rate (a backlog in the pipes does not count as keeping up)
SUSTAIN_LOSS_MAX = 0.01
SUSTAIN_PACE_MIN = 0.95
SUSTAIN_FIRST = 20_000  # msg/s in all, the first rate tried
SUSTAIN_STEP = 1.5  # each next rate while the last one held
SUSTAIN_BISECTIONS = 2  # then between the last rate that held and the first that did not
TICK_S = 0.001  # a paced publisher wakes at most this often and sends what is due

RouteName = Literal["direct", "broker", "proxy"]


@dataclass(frozen=True)
class Scale:
    """How much to send: total messages per body size (split over the publishers), and
    how many rounds of every throughput configuration (the best one counts)."""

    messages: dict[int, int]
    rounds: int
    latency_seconds: float
    latency_rounds: int  # of every path, interleaved; the round with the lowest p99 counts
    sustain_seconds: float  # how long each offered rate runs


FULL = Scale(
    messages={64: 80_000, 4096: 30_000},
    rounds=2,
    latency_seconds=5.0,
    latency_rounds=3,
    sustain_seconds=1.0,
)
QUICK = Scale(
    messages={64: 30_000, 4096: 12_000},
    rounds=1,
    latency_seconds=2.0,
    latency_rounds=1,
    sustain_seconds=0.5,
)


@dataclass(frozen=True)
class Route:
    """Where the publishers and the subscriber of one path connect."""

    name: RouteName
    pub_endpoint: str
    sub_endpoint: str
    subscriber_binds: bool  # direct: the subscriber is the CURVE server
    server_key: bytes
    key_dir: Path


@dataclass
class PublisherReport:
    """What one publisher process did, sent back to the parent."""

    sent: int
    seconds: float
    cpu_s: float
    late_p99_us: float = 0.0  # paced only: how far behind its schedule each send was


@dataclass
class SubscriberReport:
    """What the subscriber process saw, sent back to the parent."""

    received: int
    seconds: float  # first to last measured message
    cpu_s: float
    latencies_ns: list[int] = field(default_factory=list)


@dataclass
class Throughput:
    """One throughput configuration on one path."""

    path: RouteName
    body_bytes: int
    envelope_bytes: int
    publishers: int
    sent: int
    received: int
    dropped: int
    seconds: float
    msgs_per_s: int
    mb_per_s: float
    cpu_us_per_msg: dict[str, float | None]

    def total_cpu_us_per_msg(self) -> float:
        """CPU time all parties together spent per message."""
        return sum(v for v in self.cpu_us_per_msg.values() if v is not None)


@dataclass
class Trial:
    """One offered rate on one path, for the sustained rate."""

    offered_per_s: int
    sent: int
    received: int
    sent_per_s: int  # what the publishers managed: less than offered when held back
    delivered_per_s: int  # received, first to last arrival
    held: bool  # under SUSTAIN_LOSS_MAX lost; sent and delivered at SUSTAIN_PACE_MIN of it


@dataclass
class Sustained:
    """The highest rate one path sustained in one round, and every rate it tried."""

    path: RouteName
    body_bytes: int
    publishers: int
    msgs_per_s: int  # delivered at the highest offered rate that held (0: none held)
    trials: list[Trial]


@dataclass
class Latency:
    """Open-loop latency on one path."""

    path: RouteName
    rate_per_s: int
    body_bytes: int
    sent: int
    received: int
    dropped: int
    achieved_rate_per_s: float
    send_late_p99_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    broker_cpu_us_per_msg: float | None
    cdf_us: list[float]  # the 0th..100th percentiles, for the plot


# -- the messages ------------------------------------------------------------------------


def padded_body(body_bytes: int, **extra: Any) -> m.Note:
    """A Note whose msgpack encoding is ``body_bytes`` long (with ``extra`` in its data)."""
    base = m.Note(name="bench", data={"pad": "", **extra})
    overhead = len(msgspec.msgpack.encode(base))
    pad = body_bytes - overhead
    # a msgpack str header grows at 32 and 256 bytes; step back until the size is exact
    while pad > 0 and len(msgspec.msgpack.encode(_with_pad(base, pad))) > body_bytes:
        pad -= 1
    return _with_pad(base, max(pad, 0))


def _with_pad(note: m.Note, pad: int) -> m.Note:
    return m.Note(name=note.name, data={**note.data, "pad": "x" * pad})


# -- child processes ---------------------------------------------------------------------


def _cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process, all threads."""
    times = os.times()
    return times.user + times.system


def _process_cpu_s(pid: int) -> float | None:
    """CPU seconds used so far by another process, from /proc (None where there is none)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _publishing(route: Route, index: int, go: Event) -> Iterator[zmq.Socket[Any]]:
    """A publisher's socket, connected and warmed up once ``go`` is set; on exit it waits
    until everything queued is on its way."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    curve_client(sock, route.key_dir, PUBLISHER, route.server_key)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.XPUB_NODROP, 1)  # a full pipe blocks send instead of dropping
    sock.connect(route.pub_endpoint)
    _warm_up(sock, index, go)
    try:
        yield sock
    finally:
        sock.close(linger=30_000)
        ctx.term()


def _warm_up(sock: zmq.Socket[Any], index: int, go: Event) -> None:
    """Send heartbeats until told to start: they prove the CURVE handshake is done."""
    stamper = m.Stamper(PUBLISHER)
    topic = WARMUP_TOPIC.encode()
    while not go.is_set():
        beat = stamper.stamp(WARMUP_TOPIC, m.Heartbeat(state="starting", pid=index))
        try:
            sock.send_multipart([topic, m.encode(beat)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the pipe is full: the handshake is done and the next beat will do
        go.wait(0.02)


def bulk_publisher(
    route: Route,
    index: int,
    count: int,
    rate: float | None,
    body_bytes: int,
    go: Event,
    reports: Queue[Any],
) -> None:
    """Send ``count`` envelopes: ``rate`` None, as fast as the path takes them; else at
    ``rate`` per second, waking at most every ``TICK_S`` to send what is due by then (an
    absolute schedule: one late tick is made up by the next)."""
    with _publishing(route, index, go) as sock:
        stamper = m.Stamper(PUBLISHER)
        body = padded_body(body_bytes)
        topic = TOPIC.encode()
        cpu0, start = _cpu_s(), time.perf_counter()
        sent = 0
        while sent < count:
            elapsed = time.perf_counter() - start
            due = count if rate is None else min(count, int(elapsed * rate) + 1)
            for _ in range(due - sent):
                sock.send_multipart([topic, m.encode(stamper.stamp(TOPIC, body))])
            sent = due
            if rate is not None and sent < count:
                time.sleep(max(start + sent / rate - time.perf_counter(), TICK_S))
        reports.put(PublisherReport(count, time.perf_counter() - start, _cpu_s() - cpu0))


def paced_publisher(
    route: Route, count: int, rate: int, body_bytes: int, go: Event, reports: Queue[Any]
) -> None:
    """Send ``count`` envelopes on an open-loop schedule of ``rate`` per second, each
    stamped with the moment it went."""
    with _publishing(route, 0, go) as sock:
        stamper = m.Stamper(PUBLISHER)
        pad = padded_body(body_bytes, sent_ns=time.monotonic_ns()).data["pad"]
        topic = TOPIC.encode()
        interval_ns = 1_000_000_000 // rate
        late_ns = np.zeros(count, dtype=np.int64)
        cpu0 = _cpu_s()
        start = time.monotonic_ns() + 1_000_000
        now = start
        for i in range(count):
            due = start + i * interval_ns
            now = time.monotonic_ns()
            if now < due:
                # sleep overshoots by ~50 µs; the schedule is absolute, so the rate holds
                time.sleep((due - now) / 1e9)
                now = time.monotonic_ns()
            late_ns[i] = now - due
            body = m.Note(name="bench", data={"pad": pad, "sent_ns": now})
            sock.send_multipart([topic, m.encode(stamper.stamp(TOPIC, body))])
        seconds = (now - start) / 1e9
        late_p99 = percentile(late_ns, 99) / 1e3
        reports.put(PublisherReport(count, seconds, _cpu_s() - cpu0, late_p99_us=late_p99))


def subscriber(
    route: Route,
    publishers: int,
    expected: int,
    record_latency: bool,
    ready: Event,
    reports: Queue[Any],
) -> None:
    """Receive until ``expected`` messages arrived or the publishers went quiet.

    Sets ``ready`` once a warm-up heartbeat came from every publisher.
    """
    ctx: zmq.Context[Any] = zmq.Context()
    auth: zmq.auth.thread.ThreadAuthenticator | None = None
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if route.subscriber_binds:
        auth = zmq.auth.thread.ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        curve_server(sock, route.key_dir, "broker")
        sock.bind(route.sub_endpoint)
    else:
        curve_client(sock, route.key_dir, SUBSCRIBER, route.server_key)
        sock.connect(route.sub_endpoint)
    for prefix in (TOPIC, WARMUP_TOPIC):
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    sock.setsockopt(zmq.RCVTIMEO, 100)

    topic = TOPIC.encode()
    warm: set[int] = set()
    latencies: list[int] = []
    received = 0
    first_ns = last_ns = 0
    cpu0 = 0.0
    deadline = time.monotonic() + START_TIMEOUT_S + 30
    while received < expected:
        try:
            frames = sock.recv_multipart()
        except zmq.Again:
            if received == 0 and time.monotonic() < deadline:
                continue
            break  # quiet for IDLE_END_MS after the last message: the rest was dropped
        now = time.monotonic_ns()
        if frames[0] == topic:
            if received == 0:
                first_ns, cpu0 = now, _cpu_s()
                sock.setsockopt(zmq.RCVTIMEO, IDLE_END_MS)
            received += 1
            last_ns = now
            if record_latency:
                body = m.decode(frames[1]).body
                assert isinstance(body, m.Note)
                latencies.append(now - body.data["sent_ns"])
        elif len(warm) < publishers:
            beat = m.decode(frames[1]).body
            assert isinstance(beat, m.Heartbeat)
            warm.add(beat.pid)
            if len(warm) == publishers:
                ready.set()
    cpu = _cpu_s() - cpu0 if received else 0.0
    reports.put(SubscriberReport(received, (last_ns - first_ns) / 1e9, cpu, latencies))
    sock.close(linger=0)
    if auth is not None:
        auth.stop()
    ctx.term()


def broker_process(root: str, stop: Event) -> None:
    """Run a broker on ``root`` until ``stop`` is set."""
    from runtime.broker import Broker

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    broker = Broker(DataDir(Path(root)))

    def stop_when_told() -> None:
        stop.wait()
        broker.stop()

    threading.Thread(target=stop_when_told, daemon=True).start()
    broker.run()


# -- orchestration -----------------------------------------------------------------------


_spawn = mp.get_context("spawn")


@contextmanager
def broker_route(data: DataDir) -> Iterator[tuple[Route, int]]:
    """A fresh broker on ``data`` (its route and pid), stopped and its log removed on exit."""
    data.endpoints_file.unlink(missing_ok=True)
    stop = _spawn.Event()
    proc = _spawn.Process(target=broker_process, args=(str(data.root), stop), name="broker")
    proc.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not data.endpoints_file.exists():
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not start (exit code {proc.exitcode})")
            time.sleep(0.05)
        endpoints = data.read_endpoints()
        route = Route(
            name="broker",
            pub_endpoint=endpoints.pub,
            sub_endpoint=endpoints.sub,
            subscriber_binds=False,
            server_key=endpoints.broker_public_key.encode(),
            key_dir=data.keys,
        )
        assert proc.pid is not None
        yield route, proc.pid
    finally:
        stop.set()
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
        shutil.rmtree(data.logs, ignore_errors=True)


def proxy_process(root: str, ready: Event) -> None:
    """libzmq's own forwarding loop (``zmq.proxy``, in C) with CURVE on both sides and
    nothing else: no ACL, no envelope checks, no log. Runs until killed."""
    data = DataDir(Path(root))
    ctx: zmq.Context[Any] = zmq.Context()
    auth = zmq.auth.thread.ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    for sock, name in ((xsub, "proxy-pub"), (xpub, "proxy-sub")):
        curve_server(sock, data.keys, "broker")
        sock.setsockopt(zmq.SNDHWM if sock is xpub else zmq.RCVHWM, HWM)
        sock.bind(f"ipc://{data.socket_dir() / name}.sock")
    ready.set()
    zmq.proxy(xsub, xpub)


@contextmanager
def proxy_route(data: DataDir) -> Iterator[tuple[Route, int]]:
    """The floor under any CURVE broker on this machine: the same two hops as the
    broker's, forwarded by libzmq's C loop with nothing checked or logged."""
    ready = _spawn.Event()
    proc = _spawn.Process(target=proxy_process, args=(str(data.root), ready), name="proxy")
    proc.start()
    try:
        if not ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the proxy did not start (exit code {proc.exitcode})")
        assert proc.pid is not None
        route = Route(
            name="proxy",
            pub_endpoint=f"ipc://{data.socket_dir() / 'proxy-pub'}.sock",
            sub_endpoint=f"ipc://{data.socket_dir() / 'proxy-sub'}.sock",
            subscriber_binds=False,
            server_key=load_public(data.keys, "broker"),
            key_dir=data.keys,
        )
        yield route, proc.pid
    finally:
        proc.kill()
        proc.join(timeout=60)


def direct_route(data: DataDir) -> Route:
    """The subscriber binds where publishers connect; the broker's keypair serves CURVE."""
    endpoint = f"ipc://{data.socket_dir() / 'direct'}.sock"
    return Route(
        name="direct",
        pub_endpoint=endpoint,
        sub_endpoint=endpoint,
        subscriber_binds=True,
        server_key=load_public(data.keys, "broker"),
        key_dir=data.keys,
    )


@dataclass
class Run:
    """What one measurement returned: every publisher's report and the subscriber's."""

    publishers: list[PublisherReport]
    subscriber: SubscriberReport
    broker_cpu_s: float | None


def run_parties(
    route: Route,
    publisher_count: int,
    publisher: Callable[..., None],
    publisher_args: Callable[[int], tuple[Any, ...]],
    expected: int,
    record_latency: bool,
    broker_pid: int | None,
) -> Run:
    """Start the subscriber and the publishers, release them together, collect reports."""
    ready, go = _spawn.Event(), _spawn.Event()
    pub_reports: Queue[Any] = _spawn.Queue()
    sub_reports: Queue[Any] = _spawn.Queue()
    sub = _spawn.Process(
        target=subscriber,
        args=(route, publisher_count, expected, record_latency, ready, sub_reports),
    )
    sub.start()
    pubs = [
        _spawn.Process(target=publisher, args=(route, *publisher_args(i), go, pub_reports))
        for i in range(publisher_count)
    ]
    for p in pubs:
        p.start()
    try:
        if not ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"{route.name}: not every publisher reached the subscriber")
        broker_cpu0 = _process_cpu_s(broker_pid) if broker_pid else None
        go.set()
        reports = [pub_reports.get(timeout=600) for _ in pubs]
        sub_report: SubscriberReport = sub_reports.get(timeout=600)
        broker_cpu1 = _process_cpu_s(broker_pid) if broker_pid else None
    finally:
        for p in [*pubs, sub]:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    broker_cpu = None
    if broker_cpu0 is not None and broker_cpu1 is not None:
        broker_cpu = broker_cpu1 - broker_cpu0
    return Run(reports, sub_report, broker_cpu)


def measure_throughput(
    route: Route, body_bytes: int, publishers: int, total: int, broker_pid: int | None
) -> Throughput:
    """Every publisher sends ``total / publishers`` envelopes flat out."""
    per_publisher = total // publishers
    sent = per_publisher * publishers
    run = run_parties(
        route,
        publishers,
        bulk_publisher,
        lambda i: (i, per_publisher, None, body_bytes),
        sent,
        False,
        broker_pid,
    )
    got = run.subscriber
    envelope = len(m.encode(m.Stamper(PUBLISHER).stamp(TOPIC, padded_body(body_bytes))))
    rate = got.received / got.seconds if got.seconds > 0 else 0.0

    def per_msg(cpu_s: float | None, messages: int) -> float | None:
        return round(cpu_s / messages * 1e6, 2) if cpu_s is not None and messages else None

    return Throughput(
        path=route.name,
        body_bytes=body_bytes,
        envelope_bytes=envelope,
        publishers=publishers,
        sent=sent,
        received=got.received,
        dropped=sent - got.received,
        seconds=round(got.seconds, 4),
        msgs_per_s=round(rate),
        mb_per_s=round(rate * envelope / 1e6, 2),
        cpu_us_per_msg={
            # the publishers and the broker handle every message sent, dropped or not
            "publishers": per_msg(sum(r.cpu_s for r in run.publishers), sent),
            "subscriber": per_msg(got.cpu_s, got.received),
            "broker": per_msg(run.broker_cpu_s, sent),
        },
    )


def measure_trial(
    route: Route, body_bytes: int, publishers: int, rate: float, seconds: float
) -> Trial:
    """Every publisher sends its share of ``rate`` for ``seconds``; did the path keep up?"""
    per_publisher = max(1, round(rate / publishers * seconds))
    sent = per_publisher * publishers
    run = run_parties(
        route,
        publishers,
        bulk_publisher,
        lambda i: (i, per_publisher, rate / publishers, body_bytes),
        sent,
        False,
        None,
    )
    got = run.subscriber
    sending_s = max(r.seconds for r in run.publishers)
    sent_per_s = sent / sending_s if sending_s > 0 else 0.0
    delivered_per_s = got.received / got.seconds if got.seconds > 0 else 0.0
    return Trial(
        offered_per_s=round(rate),
        sent=sent,
        received=got.received,
        sent_per_s=round(sent_per_s),
        delivered_per_s=round(delivered_per_s),
        held=got.received >= (1 - SUSTAIN_LOSS_MAX) * sent
        and min(sent_per_s, delivered_per_s) >= SUSTAIN_PACE_MIN * rate,
    )


def measure_sustained(route: Route, body_bytes: int, publishers: int, seconds: float) -> Sustained:
    """The highest offered rate the path holds: up by ``SUSTAIN_STEP`` from
    ``SUSTAIN_FIRST`` until one fails, then ``SUSTAIN_BISECTIONS`` halvings of the gap."""
    trials: list[Trial] = []

    def attempt(rate: float) -> Trial:
        trial = measure_trial(route, body_bytes, publishers, rate, seconds)
        trials.append(trial)
        return trial

    best: Trial | None = None
    low, high = 0.0, float(SUSTAIN_FIRST)
    for _ in range(30):  # 20k x 1.5^30: far past any machine
        if not (trial := attempt(high)).held:
            break
        best, low, high = trial, high, high * SUSTAIN_STEP
    for _ in range(SUSTAIN_BISECTIONS):
        middle = (low * high) ** 0.5 if low else high / 2
        if (trial := attempt(middle)).held:
            best, low = trial, middle
        else:
            high = middle
    return Sustained(
        path=route.name,
        body_bytes=body_bytes,
        publishers=publishers,
        msgs_per_s=best.delivered_per_s if best else 0,
        trials=trials,
    )


def measure_latency(route: Route, seconds: float, broker_pid: int | None) -> Latency:
    """One publisher on an open-loop schedule; the subscriber times each arrival."""
    count = int(LATENCY_RATE * seconds)
    run = run_parties(
        route,
        1,
        paced_publisher,
        lambda _: (count, LATENCY_RATE, LATENCY_BODY),
        count,
        True,
        broker_pid,
    )
    sent = run.publishers[0]
    lat_us = np.asarray(run.subscriber.latencies_ns[LATENCY_SKIP:], dtype=np.float64) / 1e3
    return Latency(
        path=route.name,
        rate_per_s=LATENCY_RATE,
        body_bytes=LATENCY_BODY,
        sent=sent.sent,
        received=run.subscriber.received,
        dropped=sent.sent - run.subscriber.received,
        achieved_rate_per_s=round(sent.sent / sent.seconds),
        send_late_p99_us=round(sent.late_p99_us, 1),
        p50_us=round(percentile(lat_us, 50), 1),
        p90_us=round(percentile(lat_us, 90), 1),
        p99_us=round(percentile(lat_us, 99), 1),
        p999_us=round(percentile(lat_us, 99.9), 1),
        max_us=round(float(lat_us.max()), 1) if len(lat_us) else float("nan"),
        broker_cpu_us_per_msg=(
            round(run.broker_cpu_s / sent.sent * 1e6, 1) if run.broker_cpu_s is not None else None
        ),
        cdf_us=[round(float(v), 1) for v in np.percentile(lat_us, np.arange(101))],
    )


@dataclass
class Results:
    """Every measurement of one run; ``throughput`` holds the best round of each."""

    throughput: list[Throughput]
    rounds: list[list[Throughput]]
    sustained: list[Sustained]  # the best round of each path
    sustained_rounds: list[list[Sustained]]
    latency: list[Latency]  # the best round (lowest p99) of each path
    latency_rounds: list[list[Latency]]

    def best(self, path: RouteName, body_bytes: int, publishers: int) -> Throughput:
        """The best round of one configuration on one path."""
        return next(
            t
            for t in self.throughput
            if (t.path, t.body_bytes, t.publishers) == (path, body_bytes, publishers)
        )

    def rate(self, path: RouteName, body_bytes: int, publishers: int) -> int:
        """Messages per second received in the best round."""
        return self.best(path, body_bytes, publishers).msgs_per_s

    def sustained_rate(self, path: RouteName) -> int:
        """The highest rate ``path`` sustained in its best round."""
        return next(s.msgs_per_s for s in self.sustained if s.path == path)


def run_benchmark(scale: Scale) -> Results:
    """Every configuration on both paths (direct and broker back to back, so that load
    from elsewhere on the machine hits both alike), then the latency runs."""
    root = Path(tempfile.mkdtemp(prefix="chorus-bench-bus-"))
    data = DataDir(root)
    data.ensure()
    ensure_keys(data.keys)
    configs = [(b, p) for b in BODY_SIZES for p in PUBLISHER_COUNTS]
    rounds: list[list[Throughput]] = []
    sustained_rounds: list[list[Sustained]] = []
    latency_rounds: list[list[Latency]] = []
    print(TABLE_HEADER)
    try:
        for _ in range(scale.rounds):
            rounds.append([])
            for body_bytes, publishers in configs:
                total = scale.messages[body_bytes]
                direct = measure_throughput(direct_route(data), body_bytes, publishers, total, None)
                with broker_route(data) as (route, pid):
                    brokered = measure_throughput(route, body_bytes, publishers, total, pid)
                rounds[-1] += [direct, brokered]
                print(_throughput_row(direct), _throughput_row(brokered), sep="\n", flush=True)
            held = [measure_sustained(direct_route(data), *HEADLINE, scale.sustain_seconds)]
            with broker_route(data) as (route, _):
                held.append(measure_sustained(route, *HEADLINE, scale.sustain_seconds))
            sustained_rounds.append(held)
            print("  ".join(_sustained_row(s) for s in held), flush=True)
        for _ in range(scale.latency_rounds):
            one = [measure_latency(direct_route(data), scale.latency_seconds, None)]
            for route_of in (broker_route, proxy_route):
                with route_of(data) as (route, pid):
                    one.append(measure_latency(route, scale.latency_seconds, pid))
            latency_rounds.append(one)
            print("  ".join(f"{lat.path} p99 {lat.p99_us:.0f} µs" for lat in one), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # interference from elsewhere only ever slows a run down, so the best round counts
    best = [max(same, key=lambda t: t.msgs_per_s) for same in zip(*rounds, strict=True)]
    sustained = [
        max(same, key=lambda s: s.msgs_per_s) for same in zip(*sustained_rounds, strict=True)
    ]
    latency = [min(same, key=lambda lat: lat.p99_us) for same in zip(*latency_rounds, strict=True)]
    return Results(best, rounds, sustained, sustained_rounds, latency, latency_rounds)


# -- reporting ---------------------------------------------------------------------------

TABLE_HEADER = (
    f"{'path':<7}{'body':>8}{'pubs':>5}{'sent':>9}{'dropped':>8}{'msgs/s':>10}{'MB/s':>8}"
    f"   CPU µs/msg: {'pubs':>6}{'sub':>6}{'broker':>7}"
)


def _throughput_row(t: Throughput) -> str:
    cpu = "".join(
        f"{'-' if v is None else f'{v:.1f}':>{w}}"
        for v, w in zip(t.cpu_us_per_msg.values(), (6, 6, 7), strict=True)
    )
    return (
        f"{t.path:<7}{t.body_bytes:>6} B{t.publishers:>5}{t.sent:>9}{t.dropped:>8}"
        f"{t.msgs_per_s:>10,}{t.mb_per_s:>8.1f}{'':>15}{cpu}"
    )


def _sustained_row(s: Sustained) -> str:
    tried = ", ".join(f"{t.offered_per_s / 1000:.0f}k{'' if t.held else '✗'}" for t in s.trials)
    return f"{s.path} sustains {s.msgs_per_s:,} msg/s (tried {tried})"


def summarise(results: Results) -> dict[str, Any]:
    """The headline figures and whether they meet the targets."""
    direct = results.sustained_rate("direct")
    brokered = results.sustained_rate("broker")
    flat_direct = results.rate("direct", *HEADLINE)
    flat_broker = results.best("broker", *HEADLINE)
    latency = {lat.path: lat for lat in results.latency}
    broker_latency = latency["broker"]
    ratio = round(brokered / direct, 3) if direct else float("nan")
    # what the ratio would be if every party got its share of saturated cores: less at the
    # mercy of other load on the machine than the measured rates
    cpu_direct = results.best("direct", *HEADLINE).total_cpu_us_per_msg()
    cpu_broker = results.best("broker", *HEADLINE).total_cpu_us_per_msg()
    return {
        "direct_msgs_per_s": direct,
        "broker_msgs_per_s": brokered,
        "ratio": ratio,
        # flat out: every publisher unpaced; the broker path drops for the starved subscriber
        "flat_out_direct_msgs_per_s": flat_direct,
        "flat_out_broker_msgs_per_s": flat_broker.msgs_per_s,
        "flat_out_ratio": (
            round(flat_broker.msgs_per_s / flat_direct, 3) if flat_direct else float("nan")
        ),
        "flat_out_broker_dropped_pct": round(100 * flat_broker.dropped / flat_broker.sent, 1),
        "p50_us": broker_latency.p50_us,
        "p99_us": broker_latency.p99_us,
        "cpu_bound_ratio": round(cpu_direct / cpu_broker, 3),
        # what bounds p99: the same open loop with no broker, and through libzmq's C proxy
        "direct_p99_us": latency["direct"].p99_us,
        "proxy_p99_us": latency["proxy"].p99_us,
        "broker_cpu_us_per_msg": broker_latency.broker_cpu_us_per_msg,
        "proxy_cpu_us_per_msg": latency["proxy"].broker_cpu_us_per_msg,
        "ratio_met": ratio >= TARGET_RATIO,
        "p99_met": broker_latency.p99_us <= TARGET_P99_US,
    }


def print_tables(results: Results, summary: dict[str, Any], rounds: int) -> None:
    """The best round of every configuration, the latencies, and the headline."""
    print(f"\nthroughput flat out (unpaced publishers), best of {rounds} round(s):")
    print(TABLE_HEADER)
    for t in results.throughput:
        print(_throughput_row(t))
    print(
        f"\nsustained ({HEADLINE[0]} B, {HEADLINE[1]} publishers; under "
        f"{SUSTAIN_LOSS_MAX:.0%} lost, publishers on schedule), best of {rounds} round(s):"
    )
    for s in results.sustained:
        print(_sustained_row(s))
    print(f"\nlatency, one publisher, {LATENCY_BODY} B bodies, open loop (best round of each):")
    print(
        f"{'path':<7}{'msg/s':>8}{'got':>8}{'late p99':>10}"
        f"{'p50 µs':>9}{'p90 µs':>9}{'p99 µs':>9}{'max µs':>9}{'forwarder CPU µs/msg':>22}"
    )
    for lat in results.latency:
        print(
            f"{lat.path:<7}{lat.achieved_rate_per_s:>8,}{lat.received:>8}"
            f"{lat.send_late_p99_us:>10.0f}{lat.p50_us:>9.0f}{lat.p90_us:>9.0f}"
            f"{lat.p99_us:>9.0f}{lat.max_us:>9.0f}"
            f"{'-' if lat.broker_cpu_us_per_msg is None else lat.broker_cpu_us_per_msg:>22}"
        )
    print("('late p99': how far behind its schedule the publisher sent, a sign of CPU contention;")
    print(" proxy: libzmq's C zmq.proxy with CURVE and no checks, the floor under any broker)")
    print(
        f"\nratio (broker ÷ direct sustained, {HEADLINE[0]} B, {HEADLINE[1]} publishers) = "
        f"{summary['ratio']:.2f} (target ≥ {TARGET_RATIO}: {'met' if summary['ratio_met'] else 'MISSED'}); "
        f"broker p50 = {summary['p50_us']:.0f} µs, p99 = {summary['p99_us']:.0f} µs "
        f"(target ≤ {TARGET_P99_US:.0f} µs: {'met' if summary['p99_met'] else 'MISSED'})"
    )
    print(
        f"flat out: ratio {summary['flat_out_ratio']:.2f}, the broker path dropped "
        f"{summary['flat_out_broker_dropped_pct']:.0f}%; CPU-bound ratio (direct ÷ broker CPU "
        f"per message, all parties) = {summary['cpu_bound_ratio']:.2f}"
    )


def plot(results: Results, title: str) -> Figure:
    """Bars of msgs/s and of CPU per message for every configuration on both paths, and
    the latency distribution."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.8))
    bars, cpu, cdf = fig.subplots(1, 3)
    configs = [(b, p) for b in BODY_SIZES for p in PUBLISHER_COUNTS]
    labels = [f"{b} B\n{p} pub" for b, p in configs]
    x = np.arange(len(configs))
    sides: tuple[tuple[float, RouteName], ...] = ((-0.2, "direct"), (0.2, "broker"))
    for offset, path in sides:
        # flat out per configuration, then the headline configuration's sustained rate
        rates = [results.rate(path, b, p) for b, p in configs] + [results.sustained_rate(path)]
        drawn = bars.bar(np.arange(len(rates)) + offset, rates, width=0.4, label=path)
        bars.bar_label(drawn, labels=[f"{r / 1000:.1f}k" for r in rates], fontsize=8)
    sustained_label = f"{HEADLINE[0]} B\n{HEADLINE[1]} pub\nsustained"
    bars.set_xticks(np.arange(len(configs) + 1), [*labels, sustained_label])
    bars.set_ylabel("messages / s received")
    bars.set_title("throughput flat out, and sustained (<1% lost); CURVE, ipc://")
    bars.legend()
    for offset, path in sides:
        runs = [results.best(path, b, p) for b, p in configs]
        bottom = np.zeros(len(configs))
        for party, colour in (("publishers", "C2"), ("subscriber", "C4"), ("broker", "C3")):
            part = np.array([t.cpu_us_per_msg[party] or 0.0 for t in runs])
            cpu.bar(
                x + offset,
                part,
                width=0.4,
                bottom=bottom,
                color=colour,
                edgecolor="white",
                label=party if path == "broker" else None,
            )
            bottom += part
        for xi, top in zip(x + offset, bottom, strict=True):
            cpu.annotate(path[0], (xi, top), ha="center", va="bottom", fontsize=8)
    cpu.set_xticks(x, labels)
    cpu.set_ylabel("CPU µs per message")
    cpu.set_title("CPU per message (d = direct, b = broker)")
    cpu.set_ylim(top=cpu.get_ylim()[1] * 1.3)  # room for the legend above the bars
    cpu.legend(loc="upper left", ncols=3)
    names = {"direct": "direct", "broker": "broker", "proxy": "libzmq C proxy, no checks"}
    for lat in results.latency:
        label = f"{names[lat.path]} (p99 {lat.p99_us:.0f} µs)"
        cdf.plot(lat.cdf_us, np.arange(101), label=label)
    cdf.axvline(TARGET_P99_US, color="grey", linestyle="--", label="2 ms target")
    cdf.axhline(99, color="grey", linestyle=":", linewidth=0.8)
    cdf.set_xscale("log")
    cdf.set_xlabel("end-to-end latency (µs)")
    cdf.set_ylabel("percentile")
    cdf.set_title(f"latency at {LATENCY_RATE:,} msg/s open loop, {LATENCY_BODY} B body")
    cdf.legend(loc="lower right")
    fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Run every configuration, print the tables, write ``bus.json`` and ``bus.png``."""
    parser = argparse.ArgumentParser(description="Bus throughput and latency, direct vs broker.")
    parser.add_argument("--quick", action="store_true", help="fewer messages, one round (~1 min)")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    started = time.perf_counter()
    results = run_benchmark(scale)
    summary = summarise(results)
    wall_s = round(time.perf_counter() - started, 1)
    print_tables(results, summary, scale.rounds)
    result = {
        **summary,
        "targets": {"ratio_min": TARGET_RATIO, "p99_us_max": TARGET_P99_US},
        "headline": {"body_bytes": HEADLINE[0], "publishers": HEADLINE[1]},
        "quick": args.quick,
        "wall_s": wall_s,
        "machine": {
            "cpu_count": os.cpu_count(),
            # what this run may use: fewer than cpu_count under taskset
            "cpus_usable": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "libzmq": zmq.zmq_version(),
            "pyzmq": zmq.pyzmq_version(),
        },
        "transport": "ipc",
        "curve": True,
        "messages_per_configuration": {str(k): v for k, v in scale.messages.items()},
        "rounds": scale.rounds,
        "latency_rate_per_s": LATENCY_RATE,
        "latency_seconds": scale.latency_seconds,
        "latency_rounds": scale.latency_rounds,
        "latency_skipped_samples": LATENCY_SKIP,
        "throughput": [asdict(t) for t in results.throughput],
        "throughput_rounds": [[asdict(t) for t in one] for one in results.rounds],
        "sustain": {
            "loss_max": SUSTAIN_LOSS_MAX,
            "pace_min": SUSTAIN_PACE_MIN,
            "first_per_s": SUSTAIN_FIRST,
            "step": SUSTAIN_STEP,
            "bisections": SUSTAIN_BISECTIONS,
            "seconds_per_rate": scale.sustain_seconds,
            "tick_s": TICK_S,
        },
        "sustained": [asdict(s) for s in results.sustained],
        "sustained_rounds": [[asdict(s) for s in one] for one in results.sustained_rounds],
        "latency": [asdict(lat) for lat in results.latency],
        "latency_all_rounds": [[asdict(lat) for lat in one] for one in results.latency_rounds],
    }
    json_path = write_json("bus", result, quick=args.quick)
    title = f"bus: direct vs broker ({len(os.sched_getaffinity(0))} CPUs{', quick' if args.quick else ''})"
    png_path = save_plot(plot(results, title), "bus", quick=args.quick)
    print(f"\nwrote {json_path} and {png_path} in {wall_s} s")


if __name__ == "__main__":
    main()
