"""Fault injection: the whole system under a steady stream of conversations while each
process in turn is killed or frozen, the data directory's disk fails, and files on
disk are corrupted. Target (issue 9): no user turn lost, no task left ``running``.

    .venv/bin/python -m benchmarks.faults            # 19 faults (about 12 minutes here)
    .venv/bin/python -m benchmarks.faults --quick    # 7 faults

Starts ``python -m runtime launch`` (broker, engine with the default model, controller,
narrator, coder, search, rag) in a temp data dir and the HTTP gateway as its own
``python -m runtime serve`` process (``benchmarks/_system.py``, shared with the load
harness), which this script health-checks and restarts when it dies, as a service
manager would. Four drivers talk to it the whole time: small talk through the
embedding API (``runtime.connect`` + ``Connection.chat``), questions that need the
agents (search, coder, rag) through the same API, a conversation through the gateway
(``POST /v1/chat``), and a probe that says "hi" again and again. Then, one at a time:

* ``kill9`` and ``sigstop`` (``SIGCONT`` after ``STOP_S``) of broker, engine,
  controller, narrator, coder, search, rag and gateway; a kill waits until a turn is
  mid-stream (or, for a worker, until it holds a task) so it lands on work in flight;
* ``disk_full`` of the data dir: every Chorus process gets ``RLIMIT_FSIZE`` 0 for
  ``DISK_S``, so every write that would grow a file fails (``EFBIG``, the same ``OSError``
  path as ``ENOSPC``, with no root mount);
* ``corrupt`` of the bus log (bytes overwritten in the middle of this hour's file and a
  torn line appended) and of the task graph (``tasks.graph.json`` cut mid-JSON).

Each fault records ``detect_s`` (the first sign the system noticed: a ``sys.*`` event or
a ``Fault`` on the bus, a ``NOTICED`` event in a process log, the gateway's exit, or
its ``/healthz`` failing the service manager's health check every 2 s),
``recover_s`` (until a turn sent after the fault is answered), and the turns the fault
touched (the first fault injected while a turn was open, else the fault whose window it
was sent in): ``answered`` (a real answer), ``playbook`` (closed with an explicit
notice or error: a playbook line, an HTTP error, a refused connection) and ``lost``
(neither within ``TURN_DEADLINE_S``). At the end the task graph is read for
``stuck_tasks`` (queued, assigned or running once every turn has closed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx2 as httpx
import psutil

from benchmarks._common import save_plot, write_json
from benchmarks._system import System
from runtime import messages as m
from runtime.embed import Connection, connect
from runtime.gateway.feeds import read_sse
from runtime.paths import DataDir

Kind = Literal["kill9", "sigstop", "disk_full", "corrupt"]
Outcome = Literal["answered", "playbook", "lost", "open"]

PROCESSES = ["broker", "engine", "controller", "narrator", "coder", "search", "rag", "gateway"]
WORKERS = ("coder", "search", "rag")
FULL_PLAN: list[tuple[str, Kind]] = [
    *[(p, "kill9") for p in PROCESSES],
    *[(p, "sigstop") for p in PROCESSES],
    ("data_dir", "disk_full"),
    ("bus_log", "corrupt"),
    ("task_graph", "corrupt"),
]
QUICK_PLAN: list[tuple[str, Kind]] = [
    ("broker", "kill9"),
    ("narrator", "kill9"),
    ("controller", "kill9"),
    ("engine", "kill9"),
    ("gateway", "kill9"),
    ("data_dir", "disk_full"),
    ("task_graph", "corrupt"),
]

STOP_S = 8.0  # a frozen process stays frozen this long: past the supervisor's 5 s of heartbeats
DISK_S = 10.0  # the disk stays full this long
TURN_DEADLINE_S = 180.0  # a turn with neither an answer nor an error by then is lost
RECOVER_MAX_S = 120.0  # the schedule moves on after this long even when not recovered
IN_FLIGHT_WAIT_S = 30.0  # a kill waits at most this long for work in flight to hit
GATEWAY_RESTART_S = 1.0  # the service manager's restart delay (systemd's RestartSec)
HEALTH_EVERY_S = 2.0  # the service manager's health check of the gateway: this often
HEALTH_TIMEOUT_S = 2.0  # and a /healthz slower than this fails it
SMALL_TALK = ["hello!", "thanks!", "how are you?", "good morning!"]
WORK = [
    "Where is the assert statement documented?",
    "Compute 6 * 7 in Python and print it.",
    "Explain what a Python list is.",
    "Where is the with statement documented?",
]
GATEWAY_TALK = ["hi there", "Where is the pass statement documented?"]


@dataclass
class Turn:
    """One user turn as the user saw it."""

    via: Literal["bus", "gateway"]
    driver: str
    text: str
    sent: float  # monotonic
    first: float | None = None  # the first chunk
    ended: float | None = None
    outcome: Outcome = "open"
    detail: str = ""
    streams: list[str] = field(default_factory=list)  # the narrator's streams it heard


@dataclass
class Fault:
    process: str
    kind: Kind
    injected: float = 0.0  # monotonic
    injected_wall: float = 0.0
    in_flight: bool = False  # the fault hit work in progress (a turn mid-stream, a task)
    detect_s: float | None = None
    detected_by: str = ""
    recover_s: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(order=True)
class Sign:
    """Something that shows the system noticed a fault."""

    at: float  # monotonic
    what: str


def classify(deltas: list[tuple[str, bool]], finish: str) -> tuple[Outcome, str]:
    """A closed turn: ``answered`` when the model's words came and no notice or error,
    else ``playbook``. ``deltas`` are (text, notice) pairs."""
    notices = [d for d, notice in deltas if notice and d.strip()]
    if notices:
        return "playbook", notices[0].strip()[:120]
    if finish in ("error", "interrupted"):
        return "playbook", f"finish {finish}"
    return "answered", ""


class Harness:
    """Drives the conversations, injects the faults, and keeps the record."""

    def __init__(self, system: System, conn: Connection, *, window_s: float) -> None:
        self.system = system
        self.conn = conn
        self.window_s = window_s
        self.turns: list[Turn] = []
        self.faults: list[Fault] = []
        self.busy: dict[str, float] = {}  # worker -> when its heartbeat last said busy
        self.stop_traffic = anyio.Event()
        self.started = time.monotonic()
        self.signs: list[Sign] = []  # what the system noticed, seen from outside

    # -- traffic -------------------------------------------------------------------------

    async def bus_driver(self, name: str, texts: Sequence[str], pause_s: float) -> None:
        conversation = f"{name}-{m.new_id()[:8]}"
        i = 0
        while not self.stop_traffic.is_set():
            turn = Turn("bus", name, texts[i % len(texts)], time.monotonic())
            i += 1
            self.turns.append(turn)
            await self._bus_turn(turn, conversation)
            await anyio.sleep(pause_s)

    async def _bus_turn(self, turn: Turn, conversation: str) -> None:
        deltas: list[tuple[str, bool]] = []
        with anyio.move_on_after(TURN_DEADLINE_S):
            async for chunk in self.conn.chat(turn.text, conversation=conversation):
                turn.first = turn.first or time.monotonic()
                deltas.append((chunk.delta, chunk.notice))
                if chunk.stream not in turn.streams:
                    turn.streams.append(chunk.stream)
                if chunk.final and chunk.closes_turn:
                    turn.ended = time.monotonic()
                    turn.outcome, turn.detail = classify(deltas, chunk.finish)
                    return
        turn.outcome, turn.detail = "lost", f"{len(deltas)} chunks, never closed"

    async def gateway_driver(self, name: str, texts: Sequence[str], pause_s: float) -> None:
        conversation: str | None = None
        i = 0
        headers = {"Authorization": f"Bearer {self.system.token}"}
        async with httpx.AsyncClient(base_url=self.system.url, headers=headers) as client:
            while not self.stop_traffic.is_set():
                turn = Turn("gateway", name, texts[i % len(texts)], time.monotonic())
                i += 1
                self.turns.append(turn)
                conversation = await self._gateway_turn(client, turn, conversation)
                await anyio.sleep(pause_s if turn.outcome == "answered" else 2.0)

    async def _gateway_turn(
        self, client: httpx.AsyncClient, turn: Turn, conversation: str | None
    ) -> str | None:
        deltas: list[tuple[str, bool]] = []
        body = {"text": turn.text, "conversation": conversation}
        timeout = httpx.Timeout(10.0, read=TURN_DEADLINE_S)
        try:
            with anyio.move_on_after(TURN_DEADLINE_S):
                async with client.stream("POST", "/v1/chat", json=body, timeout=timeout) as r:
                    if r.status_code != 200:
                        await r.aread()
                        turn.ended = time.monotonic()
                        turn.outcome, turn.detail = "playbook", f"HTTP {r.status_code}"
                        return conversation
                    conversation = r.headers.get("X-Chorus-Conversation", conversation)
                    async for event, data in read_sse(r.aiter_lines()):
                        turn.first = turn.first or time.monotonic()
                        if event == "chunk":
                            deltas.append((data["delta"], data["notice"]))
                        elif event in ("final", "interrupted", "error"):
                            if event == "final" and not data["closes_turn"]:
                                continue
                            turn.ended = time.monotonic()
                            if event == "error":
                                turn.outcome, turn.detail = "playbook", data["error"][:120]
                            else:
                                finish = data.get("finish", "interrupted")
                                turn.outcome, turn.detail = classify(deltas, finish)
                            return conversation
        except httpx.TransportError as exc:  # the gateway died: the client is told so
            turn.ended = time.monotonic()
            turn.outcome, turn.detail = "playbook", f"connection: {type(exc).__name__}"
            return conversation
        turn.outcome, turn.detail = "lost", f"{len(deltas)} chunks, never closed"
        return conversation

    async def watch_bus(self) -> None:
        """Signs of detection on the bus, and which workers hold a task."""
        with self.conn.subscribe("sys.") as sys_, self.conn.subscribe("event.") as events:
            with self.conn.subscribe("heartbeat.") as beats:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._signs_from, sys_)
                    tg.start_soon(self._signs_from, events)
                    async for env in beats:
                        body = env.body
                        if isinstance(body, m.Heartbeat) and body.state == "busy":
                            self.busy[env.sender] = time.monotonic()

    async def _signs_from(self, sub: Any) -> None:
        async for env in sub:
            body = env.body
            if isinstance(body, m.ProcessEvent):
                if env.topic in ("sys.started", "sys.stopped"):
                    continue  # the outcome of a restart, not a sign that a fault was noticed
                what = f"bus: {env.topic} {body.process} ({body.reason})"
            elif isinstance(body, m.Fault):
                what = f"bus: {env.topic} {body.kind}: {body.message[:80]}"
            else:
                continue
            self.signs.append(Sign(time.monotonic(), what))

    async def keep_gateway(self) -> None:
        """The service manager's part: restart the gateway when it dies."""
        while True:
            await anyio.sleep(0.1)
            gateway = self.system.gateway
            if gateway is not None and gateway.poll() is not None:
                self.signs.append(Sign(time.monotonic(), "service manager: gateway exited"))
                await anyio.sleep(GATEWAY_RESTART_S)
                await self.system.start_gateway()

    async def check_gateway(self) -> None:
        """The service manager's health check (as compose.yaml's, more often): a
        ``/healthz`` that does not answer in time is a sign, once per failing spell."""
        failing = False
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as client:
            while True:
                await anyio.sleep(HEALTH_EVERY_S)
                try:
                    ok = (await client.get(f"{self.system.url}/healthz")).status_code == 200
                except httpx.TransportError:
                    ok = False
                if not ok and not failing:
                    what = "service manager: gateway health check failed"
                    self.signs.append(Sign(time.monotonic(), what))
                failing = not ok

    # -- faults --------------------------------------------------------------------------

    async def run_plan(self, plan: Sequence[tuple[str, Kind]]) -> None:
        for process, kind in plan:
            await self._wait_healthy()
            fault = Fault(process, kind)
            self.faults.append(fault)
            print(f"-- {process} {kind} at {time.monotonic() - self.started:.1f} s", flush=True)
            await self._inject(fault)
            await anyio.sleep(max(0.0, fault.injected + self.window_s - time.monotonic()))
            with anyio.move_on_after(RECOVER_MAX_S):
                await until(lambda f: self._recovered(f) is not None, fault)

    async def _wait_healthy(self) -> None:
        """Every process runs and a turn sent after the last fault was answered."""
        with anyio.move_on_after(RECOVER_MAX_S):
            await until(lambda: all(self.system.pid_of(p) is not None for p in PROCESSES))
            since = self.faults[-1].injected if self.faults else 0.0
            await until(lambda: any(t.outcome == "answered" and t.sent > since for t in self.turns))

    async def _inject(self, fault: Fault) -> None:
        if fault.kind == "kill9":
            fault.in_flight = await self._work_in_flight(fault.process)
        fault.injected, fault.injected_wall = time.monotonic(), time.time()
        match fault.kind:
            case "kill9":
                pid = self.system.pid_of(fault.process)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
            case "sigstop":
                pid = self.system.pid_of(fault.process)
                if pid is not None:
                    fault.in_flight = self._turn_open()
                    os.kill(pid, signal.SIGSTOP)
                    await anyio.sleep(STOP_S)
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        fault.notes.append("killed while stopped (and restarted)")
            case "disk_full":
                fault.in_flight = self._turn_open()
                self._limit_writes(0)
                await anyio.sleep(DISK_S)
                self._limit_writes(resource.RLIM_INFINITY)
            case "corrupt":
                fault.in_flight = self._turn_open()
                fault.notes.append(self._corrupt(fault.process))

    def _turn_open(self) -> bool:
        return any(t.first is not None and t.ended is None for t in self.turns)

    async def _work_in_flight(self, process: str) -> bool:
        """Wait (a while) until the kill would hit work: a task held by that worker (by
        any worker, for the controller, which tracks them), or a turn mid-stream."""
        holders = [process] if process in WORKERS else list(WORKERS)
        with anyio.move_on_after(IN_FLIGHT_WAIT_S):
            while True:
                now = time.monotonic()
                if process in WORKERS or process == "controller":
                    if any(now - self.busy.get(w, -1e9) < 0.5 for w in holders):
                        return True
                elif self._turn_open():
                    return True
                await anyio.sleep(0.05)
        return False

    def _limit_writes(self, limit: int) -> None:
        for proc in self.system.family():
            try:
                proc.rlimit(psutil.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def _corrupt(self, what: str) -> str:
        data = self.system.data
        if what == "task_graph":
            path = data.root / "tasks.graph.json"
            head = path.read_bytes()[:200] if path.exists() else b"{"
            path.write_bytes(head)  # cut mid-JSON, as a torn write would leave it
            return f"cut {path.name} to {len(head)} bytes"
        hour = max(data.logs.glob("*.jsonl"))
        size = hour.stat().st_size
        with hour.open("r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(64))
        with hour.open("ab") as f:
            f.write(b'{"id": "torn-by-the-harness", "topic": "user.o')
        return f"overwrote 64 bytes mid-{hour.name} and appended a torn line"

    def _recovered(self, fault: Fault) -> float | None:
        done = [
            t.ended
            for t in self.turns
            if t.outcome == "answered" and t.sent > fault.injected and t.ended is not None
        ]
        return min(done) - fault.injected if done else None

    # -- the record ----------------------------------------------------------------------

    def record(self) -> list[dict[str, Any]]:
        signs = self.signs + _log_signs(self.system.data)
        bounds = [f.injected for f in self.faults[1:]] + [float("inf")]
        per_fault: dict[int, list[Turn]] = {i: [] for i in range(len(self.faults))}
        for turn in self.turns:
            i = self._fault_of(turn)
            if i is not None:
                per_fault[i].append(turn)
        out = []
        for i, (fault, until) in enumerate(zip(self.faults, bounds, strict=True)):
            seen = sorted(s for s in signs if fault.injected <= s.at < until)
            if seen:
                fault.detect_s, fault.detected_by = seen[0].at - fault.injected, seen[0].what
            fault.recover_s = self._recovered(fault)
            turns = per_fault[i]
            out.append(
                {
                    "process": fault.process,
                    "kind": fault.kind,
                    "detect_s": _round(fault.detect_s),
                    "recover_s": _round(fault.recover_s),
                    "answered": sum(t.outcome == "answered" for t in turns),
                    "playbook": sum(t.outcome == "playbook" for t in turns),
                    "lost": sum(t.outcome == "lost" for t in turns),
                    "in_flight": fault.in_flight,
                    "detected_by": fault.detected_by,
                    "playbook_lines": sorted({t.detail for t in turns if t.outcome == "playbook"}),
                    "notes": fault.notes,
                }
            )
        return out

    def _fault_of(self, turn: Turn) -> int | None:
        """The first fault injected while the turn was open, else the one whose window
        it was sent in; None before the first fault."""
        end = turn.ended if turn.ended is not None else turn.sent + TURN_DEADLINE_S
        for i, fault in enumerate(self.faults):
            if turn.sent <= fault.injected <= end:
                return i
        window = [i for i, f in enumerate(self.faults) if f.injected <= turn.sent]
        return window[-1] if window else None


async def until(condition: Callable[..., bool], *args: Any, every_s: float = 0.5) -> None:
    """Poll ``condition(*args)``: it reads other processes and files, which have no event
    to await."""
    while not condition(*args):  # noqa: ASYNC110
        await anyio.sleep(every_s)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# what the processes log when they notice a fault (other warnings are often the late
# effects of an earlier fault, e.g. an engine request that timed out)
NOTICED = {
    "child_restarting",  # the supervisor: a child exited
    "child_silent",  # the supervisor: a child missed its heartbeats
    "bus_silent",  # the supervisor: no heartbeat from anyone (the broker)
    "child_gave_up",
    "log_write_failed",  # the bus log's writer
    "log_writer_restarted",
    "storage_failed",  # the controller: a writer failed (the task graph, the bus log)
    "task_graph_corrupt",
    "log_line_skipped",  # readers of the bus log: summaries, the gateway, queries
    "log_lines_skipped",
    "log_seed_skipped_lines",
    "log_torn_tail_repaired",
    "log_foreign_write",  # the bus log's writer: its file changed under it
    "log_lines_unreadable",  # the writer's index pass: lines damaged on disk
    "gateway_connection_failed",
}


def _log_signs(data: DataDir) -> list[Sign]:
    """The ``NOTICED`` events in the process logs, on the monotonic clock."""
    offset = time.monotonic() - time.time()
    signs = []
    for path in sorted(data.process_logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") not in NOTICED:
                continue
            ts = datetime.fromisoformat(entry["timestamp"]).timestamp()
            signs.append(Sign(ts + offset, f"{path.stem} log: {entry.get('event')}"))
    return signs


def stuck_tasks(data: DataDir) -> list[dict[str, Any]]:
    """Tasks of the task graph that are not finished."""
    from orchestrator.task_graph import FINISHED, TaskGraph

    return [
        {"id": n.id, "state": n.state, "agent": n.agent, "attempts": n.attempts}
        for n in TaskGraph.at(data.root).nodes()
        if n.state not in FINISHED
    ]


async def run(
    data_dir: Path,
    plan: Sequence[tuple[str, Kind]],
    *,
    window_s: float,
    gateway: bool = True,
    work: bool = True,
) -> dict[str, Any]:
    """Start everything in ``data_dir``, drive the conversations through ``plan``, and
    return the record (see the module's docstring)."""
    data = DataDir(data_dir)
    # BM25 only: building the dense index of the corpus takes minutes on 2 cores
    system = System(data, env={"CHORUS_RAG_METHOD": "bm25"})
    started = time.monotonic()
    await system.start()
    print(f"up in {time.monotonic() - started:.1f} s; gateway on {system.url}", flush=True)
    try:
        async with connect(data.root) as conn, anyio.create_task_group() as tg:
            harness = Harness(system, conn, window_s=window_s)
            tg.start_soon(harness.watch_bus)
            tg.start_soon(harness.keep_gateway)
            tg.start_soon(harness.check_gateway)
            async with anyio.create_task_group() as traffic:
                traffic.start_soon(harness.bus_driver, "probe", ["hi"], 1.0)
                traffic.start_soon(harness.bus_driver, "talk", SMALL_TALK, 2.0)
                if work:
                    traffic.start_soon(harness.bus_driver, "work", WORK, 2.0)
                if gateway:
                    traffic.start_soon(harness.gateway_driver, "gateway", GATEWAY_TALK, 2.0)
                await harness.run_plan(plan)
                harness.stop_traffic.set()  # each driver ends its turn, then stops
            with anyio.move_on_after(60):  # tasks still finishing end within their deadline
                await until(lambda: not stuck_tasks(data), every_s=1.0)
            tg.cancel_scope.cancel()
    finally:
        await system.stop()
    faults = harness.record()
    turns = harness.turns
    return {
        "faults": faults,
        "lost_turns": sum(t.outcome == "lost" for t in turns),
        "turns": len(turns),
        "answered": sum(t.outcome == "answered" for t in turns),
        "playbook": sum(t.outcome == "playbook" for t in turns),
        "stuck_tasks": stuck_tasks(data),
        "lost": [
            {
                "driver": t.driver,
                "text": t.text,
                "sent_s": round(t.sent - harness.started, 1),
                "detail": t.detail,
                "streams": t.streams,
            }
            for t in turns
            if t.outcome == "lost"
        ],
        "settings": {
            "window_s": window_s,
            "stop_s": STOP_S,
            "disk_s": DISK_S,
            "turn_deadline_s": TURN_DEADLINE_S,
        },
    }


def plot(result: dict[str, Any], quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    faults = result["faults"]
    labels = [f"{f['process']}\n{f['kind']}" for f in faults]
    x = range(len(faults))
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(8, len(faults) * 0.7), 7), sharex=True)
    width = 0.4
    a.bar([i - width / 2 for i in x], [f["detect_s"] or 0 for f in faults], width, label="detect")
    a.bar([i + width / 2 for i in x], [f["recover_s"] or 0 for f in faults], width, label="recover")
    a.set_ylabel("seconds after the fault")
    a.set_title("time to detect and to answer a new turn again")
    a.legend()
    bottom = [0] * len(faults)
    for key, color in (("answered", "#55a868"), ("playbook", "#dd8452"), ("lost", "#c44e52")):
        values = [f[key] for f in faults]
        b.bar(x, values, bottom=bottom, color=color, label=key)
        bottom = [u + v for u, v in zip(bottom, values, strict=True)]
    b.set_ylabel("user turns")
    b.set_title(f"turns each fault touched (lost in total: {result['lost_turns']})")
    b.set_xticks(list(x), labels, rotation=60, fontsize=8)
    b.legend()
    save_plot(fig, "faults", quick=quick)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="7 faults, results to benchmarks/results/quick/"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="PROCESS:KIND",
        help="just these faults, e.g. broker:kill9 (results to benchmarks/results/quick/)",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="run in this data dir and keep it (default: a temp dir)"
    )
    args = parser.parse_args()
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.only:
        plan = [(p, k) for p, _, k in (s.partition(":") for s in args.only)]  # type: ignore[misc]
    started = time.perf_counter()
    window_s = 20.0 if args.quick else 25.0
    if args.data_dir is not None:
        result = anyio.run(lambda: run(args.data_dir, plan, window_s=window_s))
    else:
        with tempfile.TemporaryDirectory(prefix="chorus-faults-") as tmp:
            result = anyio.run(lambda: run(Path(tmp) / "data", plan, window_s=window_s))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["quick"] = args.quick
    result["plan"] = [f"{p}:{k}" for p, k in plan]
    result["targets"] = {"lost_turns": 0, "stuck_tasks": 0}
    quick = args.quick or bool(args.only)  # a partial run never replaces the recorded one
    path = write_json("faults", result, quick=quick)
    for f in result["faults"]:
        print(
            f"{f['process']:>10} {f['kind']:<9} detect {f['detect_s']!s:>6} s  "
            f"recover {f['recover_s']!s:>6} s  answered {f['answered']:>2}  "
            f"playbook {f['playbook']:>2}  lost {f['lost']}  ({f['detected_by']})"
        )
    print(f"lost turns {result['lost_turns']}, stuck tasks {len(result['stuck_tasks'])}")
    plot(result, quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
