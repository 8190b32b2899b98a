"""A week of bus traffic at a high rate, on a simulated clock: rotation, retention by age
and size, compression, the task graph's archive and rolling summaries keep up, disk use
stays under the limit, and queries still answer right.

Run (from the repository root)::

    .venv/bin/python -m benchmarks.retention            # benchmarks/results/retention.{json,png}
    .venv/bin/python -m benchmarks.retention --quick    # fewer messages an hour; results/quick/

Nothing sleeps for a week: one :class:`SimClock` drives the real code. Traffic — every
process's heartbeat, ``engine.stats``, and conversations (``user.in``, acks, cues,
``task.assign.*``, ``task.update``, decisions, ``user.out`` chunk streams, subtasks,
failures and retries) built from ``runtime.messages`` — goes through the broker's
encoding (``messages.encode``, then ``decode`` as the log process does) into a real
:class:`~orchestrator.log.writer.LogWriter` (``clock=``, ``compress=True``), which
rotates, compresses, indexes and applies retention by itself. A few heartbeats arrive up
to 20 minutes late, so lines land in closed (even compressed) hours. The controller's
task-graph writes go through :class:`~orchestrator.task_graph.TaskGraph` (``clock=``,
so its hourly archive runs on simulated time), and every simulated hour the rolling
summaries of the conversations that spoke are brought up to date without the engine (the
extractive summary of ``orchestrator.log.summarize``). Traffic follows the day (busier
by day, UTC) and triples after four days, so age retention decides first and size later.

Every ``sample_every_s`` of simulated time the writer is let to settle and the log's
disk use (every file in ``logs/``, indexes and temp files included) is sampled; a reader
thread meanwhile queries closed hours while the writer compresses and deletes them, and
counts any answer that is wrong. At the end the retained log is checked file by file
(one hour per file, every line of its hour, as many lines as were generated for the
hours kept), and ``python -m runtime logs | decisions | tasks`` (as processes) are
checked against what was generated and timed.

``retention.json`` keys: ``checks`` (each invariant, true when it held; ``ok`` is their
conjunction), ``disk`` (limit, the largest settled sample, the largest seen unsettled),
``rotation``, ``retention``, ``compression``, ``task_graph``, ``summaries``, ``queries``
(each with its answer, the expected one and its latency), ``samples`` (the series in the
plot). Wall time on the busy 2-core VM: full about 5.5 minutes, ``--quick`` 1.5-2.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import heapq
import itertools
import json
import logging
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import structlog

from benchmarks._common import save_plot, write_json
from orchestrator.log import summarize
from orchestrator.log.layout import HOUR_S, hour_file_name, hour_of, list_log_files, parse_name
from orchestrator.log.query import LogQuery, query_lines
from orchestrator.log.retention import DAY_S, MIB
from orchestrator.log.writer import LogWriter
from orchestrator.task_graph import ARCHIVE_EVERY_S, FINISHED, TaskGraph
from runtime import messages as m
from runtime.paths import DataDir

REPO = Path(__file__).resolve().parent.parent
START = 1736121600.0  # 2025-01-06T00:00:00Z, a Monday: simulated time starts here
PROCESSES = ("controller", "narrator", "coder", "search", "rag")
AGENTS = ("coder", "search", "rag")
STUCK_TASKS = 3  # assigned in the last hour and never finished: `tasks --state running`


@dataclass(frozen=True)
class WeekConfig:
    """How much traffic, for how long, and the limits it runs under."""

    days: float = 7.0
    heartbeat_s: float = 2.0  # each of PROCESSES (agents/runtime.py sends one a second)
    stats_s: float = 4.0  # engine.stats
    turns_per_hour: float = 20.0  # user turns (mean over a day), one task each
    chunks_per_answer: int = 60  # user.out chunks of a result's answer
    ramp_from_day: float = 4.0  # from here turns x ramp and answers twice as long
    ramp: float = 3.0
    late_per_hour: int = 6  # heartbeats that arrive 1-20 minutes late
    conversations: int = 40
    retain_days: float = 3.0
    retain_mb: float = 20.0
    compress: bool = True
    task_retain_s: float = 6 * HOUR_S  # finished tasks leave the graph after this
    sample_every_s: float = 1800.0
    summarize_every_s: float = 3600.0
    reader: bool = True  # query closed hours from another thread while maintenance runs
    seed: int = 7


FULL = WeekConfig()
QUICK = WeekConfig(
    heartbeat_s=10.0, stats_s=20.0, turns_per_hour=6.0, chunks_per_answer=30, retain_mb=4.0
)


class SimClock:
    """The simulated time every component reads (``clock=``)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- traffic -----------------------------------------------------------------------------

GraphOp = Callable[[TaskGraph], object]
Event = tuple[float, int, m.Envelope | GraphOp]  # (arrival, order, what)


@dataclass
class Expected:
    """What the simulation generated, counted so answers can be checked."""

    per_hour: Counter[int] = field(default_factory=Counter)  # envelopes by hour of ts
    task_minutes: Counter[int] = field(default_factory=Counter)  # task.* by minute of ts
    decisions: Counter[tuple[str, int]] = field(default_factory=Counter)  # (action, minute)
    per_task: Counter[tuple[str, int]] = field(default_factory=Counter)  # (task, hour)
    narrator_by_conv: Counter[tuple[str, int]] = field(default_factory=Counter)
    turns: Counter[str] = field(default_factory=Counter)  # summary turns per conversation
    last_topic_id: dict[str, str] = field(default_factory=dict)  # per conversation
    last_topic_ts: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, str] = field(default_factory=dict)  # task -> conversation
    stuck: list[str] = field(default_factory=list)
    late: int = 0


class Traffic:
    """Builds the week's events in arrival order (a heap keyed by arrival time)."""

    def __init__(self, config: WeekConfig, start: float) -> None:
        self.config = config
        self.start = start
        self.end = start + config.days * DAY_S
        self.rng = random.Random(config.seed)
        self.heap: list[Event] = []
        self.order = itertools.count()
        self.ids = itertools.count(1)
        self.seqs: Counter[str] = Counter()
        self.expected = Expected()
        self.recent: list[str] = []  # conversations active lately: users come back

    def push(self, arrival: float, item: m.Envelope | GraphOp) -> None:
        heapq.heappush(self.heap, (arrival, next(self.order), item))

    def envelope(
        self,
        ts: float,
        topic: str,
        sender: str,
        body: m.Body,
        *,
        conversation: str | None = None,
        task: str | None = None,
        delay: float = 0.0,
    ) -> m.Envelope:
        self.seqs[sender] += 1
        env = m.Envelope(
            id=f"{sender}-{next(self.ids)}",
            topic=topic,
            sender=sender,
            ts=ts,
            seq=self.seqs[sender],
            body=body,  # type: ignore[arg-type]
            conversation=conversation,
            task=task,
        )
        self.push(ts + delay, env)
        return env

    def delivered(self, env: m.Envelope) -> None:
        """Count an envelope handed to the log (what the log must then hold)."""
        exp = self.expected
        hour = int(env.ts // HOUR_S)
        exp.per_hour[hour] += 1
        if env.topic.startswith("task."):
            exp.task_minutes[int(env.ts // 60)] += 1
        if isinstance(env.body, m.Decision):
            exp.decisions[(env.body.action, int(env.ts // 60))] += 1
        if env.task is not None:
            exp.per_task[(env.task, hour)] += 1
        if env.conversation is not None:
            if env.sender == "narrator":
                exp.narrator_by_conv[(env.conversation, hour)] += 1
            if env.topic.startswith(summarize.TOPICS):
                exp.last_topic_id[env.conversation] = env.id
                exp.last_topic_ts[env.conversation] = env.ts

    def rate(self, t: float) -> float:
        """Turns per second at ``t``: a day's curve (quiet at night, UTC), then the ramp."""
        hour = (t % DAY_S) / HOUR_S
        day_curve = 0.4 + 1.2 * max(0.0, 1 - abs(hour - 14) / 8)  # mean ~1 over a day
        ramp = self.config.ramp if t - self.start >= self.config.ramp_from_day * DAY_S else 1.0
        return self.config.turns_per_hour * day_curve * ramp / HOUR_S

    def background(self, t0: float, t1: float) -> None:
        """Heartbeats and engine stats with ``t0 <= ts < t1``; a few of them late."""
        c = self.config
        late_p = c.late_per_hour / (HOUR_S / c.heartbeat_s * len(PROCESSES))
        for k, proc in enumerate(PROCESSES):
            phase = (k + 1) * c.heartbeat_s / (len(PROCESSES) + 1)
            n = math.ceil((t0 - self.start - phase) / c.heartbeat_s)
            ts = self.start + phase + max(0, n) * c.heartbeat_s
            while ts < t1:
                delay = 0.0
                if self.rng.random() < late_p:
                    delay = self.rng.uniform(60, 1200)
                    self.expected.late += 1
                busy = self.rng.random() < 0.3
                body = m.Heartbeat(
                    state="busy" if busy else "idle", pid=4000 + k, load=round(self.rng.random(), 2)
                )
                self.envelope(ts, f"heartbeat.{proc}", proc, body, delay=delay)
                ts += c.heartbeat_s
        n = int((t0 - self.start) // c.stats_s)
        ts = self.start + max(0, n) * c.stats_s
        ts = ts if ts >= t0 else ts + c.stats_s
        while ts < t1:
            stats = m.EngineStats(
                tokens_per_s=round(30 + 20 * self.rng.random(), 1),
                sessions=2,
                active_requests=self.rng.randrange(3),
                cache_fill=round(self.rng.random(), 3),
                device="cpu",
                resident_mb=512.0,
            )
            self.envelope(ts, "engine.stats", "engine", stats)
            ts += c.stats_s

    def turns(self, t0: float, t1: float) -> None:
        """User turns starting in ``[t0, t1)``, each with its whole exchange scheduled."""
        t = t0
        last_turn_at = self.end - 900  # the last 15 minutes are quiet: every turn completes
        while True:
            t += self.rng.expovariate(self.rate(t))
            if t >= t1 or t >= last_turn_at:
                return
            self.turn(t)

    def _conversation(self) -> str:
        if self.recent and self.rng.random() < 0.8:
            conv = self.rng.choice(self.recent)
        else:
            conv = f"c-{self.rng.randrange(self.config.conversations)}"
        if conv not in self.recent:
            self.recent = [*self.recent[-9:], conv]
        return conv

    def turn(self, t: float, *, stuck: bool = False) -> None:
        rng, conv = self.rng, self._conversation()
        ramped = t - self.start >= self.config.ramp_from_day * DAY_S
        text = f"question {next(self.ids)} about {rng.choice(['lists', 'dicts', 'asyncio'])}"
        user = self.envelope(t, "user.in", "client", m.UserTurn(text=text), conversation=conv)
        self.expected.turns[conv] += 1
        self.envelope(t + 0.002, "ack.client", "controller", m.Ack(id=user.id), conversation=conv)
        self._say(t + 0.01, conv, user.id, "ack", "On it, asking an agent.", 4)
        agent = rng.choice(AGENTS)
        task = f"t-{next(self.ids)}"
        done = self._task(t + 0.05, conv, task, agent, text, stuck=stuck, parent=None)
        if stuck:
            self.expected.stuck.append(task)
            return
        if rng.random() < 0.1:  # a subtask under it, finished before it
            child = f"{task}.1"
            self._task(t + 0.5, conv, child, rng.choice(AGENTS), text, parent=task, cap=done)
        chunks = self.config.chunks_per_answer * (2 if ramped else 1)
        self._say(done + 0.01, conv, user.id, "result", f"Here is what {agent} found.", chunks)

    def _say(self, t: float, conv: str, turn: str, kind: str, text: str, chunks: int) -> None:
        """A cue, its ack, the narrator's decision and its chunk stream."""
        rng = self.rng
        cue = m.Cue(speak_now=True, priority=1, reason=kind, kind=kind, turn=turn)  # type: ignore[arg-type]
        cue_env = self.envelope(t, "narrator.cue", "controller", cue, conversation=conv)
        self.envelope(
            t + 0.002, "ack.controller", "narrator", m.Ack(id=cue_env.id), conversation=conv
        )
        action = rng.choices(["spoken", "held", "coalesced"], [0.8, 0.15, 0.05])[0]
        decision = m.Decision(action=action, reason=f"{kind} cue", cue=cue_env.id)  # type: ignore[arg-type]
        self.envelope(t + 0.01, "narrator.decision", "narrator", decision, conversation=conv)
        stream = f"s-{next(self.ids)}"
        words = (text + " " + " ".join(f"w{rng.randrange(999)}" for _ in range(chunks))).split()
        step = 0.05
        for i in range(chunks):
            final = i == chunks - 1
            delta = " ".join(words[i * len(words) // chunks : (i + 1) * len(words) // chunks])
            chunk = m.Chunk(
                stream=stream,
                seq=i,
                delta=delta + " ",
                final=final,
                finish="done" if final else "",
                closes_turn=final and kind == "result",
                turn=turn,
            )
            self.envelope(t + 0.02 + i * step, "user.out", "narrator", chunk, conversation=conv)
        self.expected.turns[conv] += 1
        end = t + 0.03 + chunks * step
        done = m.Decision(action="finished", reason="stream ended", cue=cue_env.id)
        self.envelope(end, "narrator.decision", "narrator", done, conversation=conv)

    def _task(
        self,
        t: float,
        conv: str,
        task: str,
        agent: str,
        text: str,
        *,
        parent: str | None,
        stuck: bool = False,
        cap: float | None = None,
    ) -> float:
        """Assign, accept, progress and finish one task (graph writes included); returns
        when it finished."""
        rng = self.rng
        self.expected.tasks[task] = conv
        assign = m.TaskAssign(task=task, kind=agent, text=text)
        env = self.envelope(
            t, f"task.assign.{agent}", "controller", assign, conversation=conv, task=task
        )

        def added(graph: TaskGraph) -> None:
            graph.add(task, kind=agent, conversation=conv, agent=agent, parent=parent)
            graph.transition(task, "assigned", agent=agent)

        self.push(t, added)
        self.envelope(t + 0.002, "ack.controller", agent, m.Ack(id=env.id), task=task)
        accepted = m.TaskUpdate(task=task, state="accepted")
        self.envelope(t + 0.1, "task.update", agent, accepted, conversation=conv, task=task)
        self.push(t + 0.1, lambda g: g.transition(task, "running", agent=agent))
        if stuck:
            return t
        duration = rng.uniform(2, 60) if cap is None else max(0.5, (cap - t) * 0.8)
        for k in range(1, int(duration // 10) + 1):
            progress = m.TaskUpdate(task=task, state="progress", progress=k * 10 / duration)
            self.envelope(t + k * 10, "task.update", agent, progress, conversation=conv, task=task)
        if rng.random() < 0.05:  # a failure, retried once
            failed = m.TaskUpdate(task=task, state="failed", message="tool crashed")
            end = t + duration
            self.envelope(end, "task.update", agent, failed, conversation=conv, task=task)
            self.push(end, lambda g: g.transition(task, "failed", error="tool crashed"))
            self.push(end + 1, lambda g: g.transition(task, "queued", error="retrying"))
            again = m.TaskAssign(task=task, kind=agent, text=text, attempt=2)
            self.envelope(
                end + 1, f"task.assign.{agent}", "controller", again, conversation=conv, task=task
            )
            self.push(end + 1, lambda g: g.transition(task, "assigned", agent=agent))
            self.push(end + 1.1, lambda g: g.transition(task, "running", agent=agent))
            t, duration = end + 1, rng.uniform(2, 20) if cap is None else 0.2
        end = t + duration
        result = m.TaskUpdate(task=task, state="result", message=f"found {rng.randrange(99)} hits")
        self.envelope(end, "task.update", agent, result, conversation=conv, task=task)
        self.push(end, lambda g: g.transition(task, "succeeded", result="found hits"))
        return end

    def until(self, t1: float) -> Iterator[tuple[float, m.Envelope | GraphOp]]:
        """Events that arrive before ``t1``, in arrival order."""
        heap = self.heap
        while heap and heap[0][0] < t1:
            arrival, _, item = heapq.heappop(heap)
            yield arrival, item


# -- measuring ---------------------------------------------------------------------------


def disk_use(log_dir: Path) -> tuple[int, Counter[str]]:
    """Bytes of every regular file in ``log_dir`` (not below it), and files by kind."""
    total, kinds = 0, Counter[str]()
    with os.scandir(log_dir) as entries:
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # deleted while we looked
                continue
            name = entry.name
            kind = (
                "tmp"
                if name.startswith(".")
                else "gz"
                if name.endswith(".gz")
                else "idx"
                if name.endswith(".idx")
                else "plain"
            )
            kinds[kind] += 1
    return total, kinds


class ClosedHourReader(threading.Thread):
    """Queries closed hours while the writer compresses and deletes them; an answer is
    right when it has every ``task.`` line of the hour, or none because the hour is gone."""

    def __init__(self, log_dir: Path, expected: Expected) -> None:
        super().__init__(name="closed-hour-reader", daemon=True)
        self.log_dir, self.expected = log_dir, expected
        self.settled_until = 0.0  # hours that ended before this are completely written
        self.stop = threading.Event()
        self.queries = self.wrong = 0
        self.max_bytes = 0
        self.errors: list[str] = []
        self.rng = random.Random(1)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.max_bytes = max(self.max_bytes, disk_use(self.log_dir)[0])
            hours = [
                f.hour
                for f in list_log_files(self.log_dir)
                if f.hour + HOUR_S <= self.settled_until
            ]
            if not hours:
                continue
            hour = self.rng.choice(hours[-4:])  # the newest closed hours get compressed
            want = sum(self.expected.task_minutes[int(hour // 60) + i] for i in range(60))
            q = LogQuery(since=hour, until=hour + HOUR_S, topics=("task.",))
            try:
                got = sum(1 for _ in query_lines(self.log_dir, q, warn=self.errors.append))
            except Exception as exc:  # a reader must never crash on files moving under it
                self.errors.append(repr(exc))
                got = -1
            self.queries += 1
            gone = not list_log_files(self.log_dir, hour, hour + HOUR_S)
            if got != want and not (got == 0 and gone):
                self.wrong += 1
                self.errors.append(f"hour {hour_file_name(hour)}: {got} lines, want {want}")


@dataclass
class Sample:
    t_h: float  # simulated hours since the start
    envelopes: int  # handed to the writer so far
    log_bytes: int
    plain: int
    gz: int
    idx: int
    tmp: int
    graph_nodes: int
    graph_updated: float  # when the graph was last written (simulated time)
    graph_bytes: int
    archive_bytes: int


@dataclass
class WeekRun:
    """Everything a simulated week produced, for the checks and the report."""

    config: WeekConfig
    data: DataDir
    start: float
    end: float
    expected: Expected
    samples: list[Sample] = field(default_factory=list)
    hours_seen: set[str] = field(default_factory=set)
    deleted_age: list[str] = field(default_factory=list)
    deleted_size: list[str] = field(default_factory=list)
    late_plain_parts: int = 0  # a plain file seen beside the .gz of its hour
    graph_max_nodes: int = 0
    summary_rounds: int = 0
    summary_updates: int = 0
    summary_s: list[float] = field(default_factory=list)
    summary_max_lag_s: float = 0.0
    reader_queries: int = 0
    reader_wrong: int = 0
    reader_errors: list[str] = field(default_factory=list)
    max_unsettled_bytes: int = 0
    envelopes: int = 0
    written: int = 0
    failed: int = 0
    wall_s: float = 0.0


def _count_tokens(text: str) -> int:
    return len(text.split())


def simulate(config: WeekConfig, root: Path, *, progress: bool = False) -> WeekRun:
    """Run the week into the data directory ``root``; the writer is closed at the end."""
    began = time.perf_counter()
    data = DataDir.at(root)
    clock = SimClock(START)
    traffic = Traffic(config, START)
    run = WeekRun(config, data, START, traffic.end, traffic.expected)
    writer = LogWriter(
        data.logs,
        flush_s=0.0,  # write at every wake-up of the writer thread: settling is quick
        retain_days=config.retain_days,
        retain_mb=config.retain_mb,
        compress=config.compress,
        clock=clock,
    )
    graph = TaskGraph(data.task_graph, retain_s=config.task_retain_s, clock=clock)
    reader = ClosedHourReader(data.logs, traffic.expected)
    writer.start()
    if config.reader:
        reader.start()
    present: set[str] = set()
    spoke: set[str] = set()  # conversations with summarised traffic since the last round
    tick = 60.0
    next_sample = START + config.sample_every_s
    next_summary = START + config.summarize_every_s
    try:
        t = START
        while t < traffic.end:
            t1 = min(t + tick, traffic.end)
            traffic.background(t, t1)
            traffic.turns(t, t1)
            if t <= traffic.end - HOUR_S < t1:  # tasks that never finish
                for _ in range(STUCK_TASKS):
                    traffic.turn(t + 1, stuck=True)
            for arrival, item in traffic.until(t1):
                clock.now = max(clock.now, arrival)
                if isinstance(item, m.Envelope):
                    writer.append(m.decode(m.encode(item)))  # as the broker hands it over
                    traffic.delivered(item)
                    run.envelopes += 1
                    if item.conversation and item.topic.startswith(summarize.TOPICS):
                        spoke.add(item.conversation)
                else:
                    item(graph)
            clock.now = t = t1
            if t >= next_summary or t >= traffic.end:
                _settle(writer)
                run.summary_max_lag_s = max(
                    run.summary_max_lag_s, _summarize(run, data, sorted(spoke))
                )
                spoke.clear()
                next_summary += config.summarize_every_s
            if t >= next_sample or t >= traffic.end:
                _settle(writer)
                reader.settled_until = t
                _sample(run, data, graph, t, present)
                next_sample += config.sample_every_s
                if progress and len(run.samples) % 24 == 0:
                    last = run.samples[-1]
                    print(
                        f"  day {last.t_h / 24:4.1f}: {run.envelopes:>9,} envelopes, "
                        f"log {last.log_bytes / MIB:6.1f} MiB, graph {last.graph_nodes} nodes, "
                        f"{time.perf_counter() - began:5.0f} s",
                        file=sys.stderr,
                    )
    finally:
        reader.stop.set()
        if reader.is_alive():
            reader.join(timeout=30)
        _settle(writer)
        writer.close()
    run.written, run.failed = writer.written, writer.failed
    run.reader_queries, run.reader_wrong = reader.queries, reader.wrong
    run.reader_errors = reader.errors[:20]
    run.max_unsettled_bytes = reader.max_bytes
    run.wall_s = time.perf_counter() - began
    return run


def _settle(writer: LogWriter) -> None:
    if not writer.settle(timeout=120):
        raise RuntimeError("the log writer did not catch up within 120 s")


def _sample(run: WeekRun, data: DataDir, graph: TaskGraph, t: float, present: set[str]) -> None:
    total, kinds = disk_use(data.logs)
    files = list_log_files(data.logs)
    names = {f.stem for f in files}
    for stem in present - names:  # gone since the last sample: by age, or for size
        hour = parse_name(Path(stem + ".jsonl"))
        assert hour is not None
        aged = hour.hour + HOUR_S <= t - run.config.retain_days * DAY_S
        (run.deleted_age if aged else run.deleted_size).append(stem)
    present.clear()
    present.update(names)
    run.hours_seen |= names
    stems = Counter(f.stem for f in files)
    run.late_plain_parts += sum(1 for n in stems.values() if n > 1)
    graph_file = graph.read()
    nodes = len(graph_file.nodes)
    run.graph_max_nodes = max(run.graph_max_nodes, nodes)
    run.samples.append(
        Sample(
            t_h=round((t - run.start) / HOUR_S, 3),
            envelopes=run.envelopes,
            log_bytes=total,
            plain=kinds["plain"],
            gz=kinds["gz"],
            idx=kinds["idx"],
            tmp=kinds["tmp"],
            graph_nodes=nodes,
            graph_updated=graph_file.updated,
            graph_bytes=_size(data.task_graph),
            archive_bytes=_size(graph.archive_path),
        )
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _summarize(run: WeekRun, data: DataDir, conversations: list[str]) -> float:
    """Bring the summaries of ``conversations`` up to date; returns the largest lag left
    (seconds between the last envelope logged for a conversation and the last one its
    summary covers; an answer still streaming is left for the next round)."""
    began = time.perf_counter()

    async def update_all() -> None:
        for conv in conversations:
            if await summarize.update(data, conv, None, _count_tokens) is not None:
                run.summary_updates += 1

    asyncio.run(update_all())
    run.summary_s.append(time.perf_counter() - began)
    run.summary_rounds += 1
    lag = 0.0
    for conv in conversations:
        sidecar = summarize.read_sidecar(data, conv)
        lag = max(lag, run.expected.last_topic_ts[conv] - sidecar.last_ts)
    return lag


# -- the checks at the end ---------------------------------------------------------------


def check_files(run: WeekRun) -> dict[str, Any]:
    """Every retained hour file holds only its hour's lines, and as many as were generated
    with a ``ts`` in that hour (plain and compressed parts together)."""
    lines: Counter[int] = Counter()
    misplaced = 0
    for f in list_log_files(run.data.logs):
        opener = gzip.open if f.compressed else open
        with opener(f.path, "rb") as handle:
            for line in handle:
                ts = msgspec.json.decode(line, type=_Ts).ts
                misplaced += hour_of(ts) != f.hour
                lines[int(f.hour // HOUR_S)] += 1
    want = {h: run.expected.per_hour[h] for h in lines}
    short = {hour_file_name(h * HOUR_S): (lines[h], n) for h, n in want.items() if lines[h] != n}
    kept = sorted(lines)
    contiguous = kept == list(range(kept[0], kept[-1] + 1)) if kept else False
    return {
        "hours_kept": len(kept),
        "oldest_kept": hour_file_name(kept[0] * HOUR_S) if kept else None,
        "newest_kept": hour_file_name(kept[-1] * HOUR_S) if kept else None,
        "lines_kept": sum(lines.values()),
        "misplaced_lines": misplaced,
        "hours_with_wrong_count": short,
        "contiguous": contiguous,
        "kept_hours": kept,
    }


class _Ts(msgspec.Struct):
    ts: float


def _cli(data: DataDir, args: list[str]) -> tuple[list[bytes], float]:
    """Run ``python -m runtime ARGS`` on the data directory twice (the first warms the
    page and bytecode caches); returns its stdout lines and the second run's seconds."""
    cmd = [sys.executable, "-m", "runtime", args[0], "--data-dir", str(data.root), *args[1:]]
    seconds, out = 0.0, b""
    for _ in range(2):
        began = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, cwd=REPO, check=False, timeout=120)
        seconds = time.perf_counter() - began
        if done.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(args)}: exit {done.returncode}: {done.stderr[-500:]!r}"
            )
        out = done.stdout
    return out.splitlines(), seconds


def _timed(answer: Callable[[], int]) -> tuple[int, float]:
    """The answer and the median seconds of three calls."""
    times, got = [], -1
    for _ in range(3):
        began = time.perf_counter()
        got = answer()
        times.append(time.perf_counter() - began)
    return got, statistics.median(times)


def check_queries(run: WeekRun, kept_hours: list[int], *, cli: bool = True) -> list[dict[str, Any]]:
    """``runtime logs | decisions | tasks`` answers against what was generated, each
    asked as a process (``cli``) and in process; with their latencies."""
    exp, data = run.expected, run.data
    kept = set(kept_hours)
    newest = kept_hours[-1] * HOUR_S
    results: list[dict[str, Any]] = []

    def check(name: str, args: list[str], want: int, answer: Callable[[], int]) -> None:
        got, seconds = _timed(answer)
        row: dict[str, Any] = {"query": name, "args": shlex.join(args), "want": want, "got": got}
        row["in_process_s"] = round(seconds, 4)
        if cli:
            lines, cli_s = _cli(data, args)
            row["cli_got"], row["cli_s"] = len(lines), round(cli_s, 3)
        row["ok"] = got == want and row.get("cli_got", want) == want
        results.append(row)

    def logs(name: str, args: list[str], query: LogQuery, want: int) -> None:
        check(name, args, want, lambda: sum(1 for _ in query_lines(data.logs, query)))

    # an hour from half past, across two files (the older one compressed by now)
    since, until = newest - 2 * HOUR_S + 1800, newest - HOUR_S + 1800
    want = sum(exp.task_minutes[mi] for mi in range(int(since // 60), int(until // 60)))
    args = ["logs", "--topic", "task.", "--since", repr(since), "--until", repr(until), "--json"]
    logs(
        "task traffic, one hour", args, LogQuery(since=since, until=until, topics=("task.",)), want
    )
    # a task from the oldest hour kept, a recent one, and one whose hours were deleted
    tasks_kept = sorted({t for (t, h) in exp.per_task if h in kept}, key=_task_number)
    gone = sorted({t for (t, h) in exp.per_task if h < kept_hours[0]} - set(tasks_kept))
    picks = [("a task in the oldest hour kept", tasks_kept[0]), ("a recent task", tasks_kept[-1])]
    picks += [("a task from a deleted hour", gone[-1])] if gone else []
    for name, task in picks:
        want = sum(n for (t, h), n in exp.per_task.items() if t == task and h in kept)
        logs(name, ["logs", "--task", task, "--json"], LogQuery(task=task), want)
    # the busiest conversation's narrator lines over everything kept
    per_conv = Counter[str]()
    for (conv, hour), n in exp.narrator_by_conv.items():
        per_conv[conv] += n if hour in kept else 0
    conv, want = per_conv.most_common(1)[0]
    args = ["logs", "-c", conv, "--sender", "narrator", "--json"]
    logs(
        "a conversation's narrator lines",
        args,
        LogQuery(conversation=conv, senders=("narrator",)),
        want,
    )
    logs(
        "the newest 50 lines",
        ["logs", "-n", "50", "--json"],
        LogQuery(newest_first=True, limit=50),
        50,
    )
    # decisions held in the last day
    since = newest - DAY_S
    want = sum(n for (a, mi), n in exp.decisions.items() if a == "held" and mi >= since // 60)
    query = LogQuery(since=since, topics=("narrator.decision",), needles=(b'"action":"held"',))
    args = ["decisions", "--action", "held", "--since", repr(since), "--json"]
    logs("decisions held, last day", args, query, want)
    # the tasks still running: the stuck ones
    graph = TaskGraph(data.task_graph)
    running = sorted(n.id for n in graph.nodes(states=["running"]))
    check(
        "tasks running",
        ["tasks", "--state", "running", "--json"],
        len(exp.stuck),
        lambda: len(graph.nodes(states=["running"])),
    )
    results[-1]["ok"] = results[-1]["ok"] and running == sorted(exp.stuck)
    return results


def _task_number(task: str) -> int:
    return int(task.removeprefix("t-").split(".")[0])


def check_graph(run: WeekRun) -> dict[str, Any]:
    """Live and archived tasks: every task in exactly one, finished ones archived."""
    graph = TaskGraph(run.data.task_graph, retain_s=run.config.task_retain_s)
    graph_file = graph.read()
    live = graph_file.nodes
    archived = graph.archived()
    archived_ids = [n.id for n in archived]
    every = set(run.expected.tasks)
    # the first write of each hour archives: by the last write, what was due an hour before
    cutoff = graph_file.updated - run.config.task_retain_s - ARCHIVE_EVERY_S
    overdue = [
        n.id
        for n in live.values()
        if n.state in FINISHED
        and n.updated < cutoff
        and not any(o.parent == n.id for o in live.values() if o.id != n.id)
    ]
    return {
        "tasks": len(every),
        "live": len(live),
        "live_max": run.graph_max_nodes,
        "archived": len(archived_ids),
        "archived_twice": len(archived_ids) - len(set(archived_ids)),
        "in_both": len(set(archived_ids) & set(live)),
        "in_neither": len(every - set(archived_ids) - set(live)),
        "archived_unfinished": sum(1 for n in archived if n.state not in FINISHED),
        "finished_overdue_in_graph": len(overdue),
        "graph_bytes": _size(run.data.task_graph),
        "archive_bytes": _size(graph.archive_path),
    }


def check_summaries(run: WeekRun) -> dict[str, Any]:
    """Each conversation's summary covers its last turn and counts every turn."""
    behind, wrong_turns, methods = [], [], Counter[str]()
    for conv, turns in run.expected.turns.items():
        sidecar = summarize.read_sidecar(run.data, conv)
        methods[sidecar.method] += 1
        if sidecar.last_id != run.expected.last_topic_id.get(conv):
            behind.append(conv)
        if sidecar.turns != turns:
            wrong_turns.append((conv, sidecar.turns, turns))
    return {
        "conversations": len(run.expected.turns),
        "behind": behind[:10],
        "wrong_turn_counts": wrong_turns[:10],
        "methods": dict(methods),
        "rounds": run.summary_rounds,
        "updates": run.summary_updates,
        "round_s_median": round(statistics.median(run.summary_s), 4) if run.summary_s else None,
        "round_s_max": round(max(run.summary_s), 4) if run.summary_s else None,
        "max_lag_s": round(run.summary_max_lag_s, 1),
    }


def evaluate(run: WeekRun, *, cli: bool = True) -> dict[str, Any]:
    """All checks; ``checks`` holds one boolean per invariant."""
    c = run.config
    limit = c.retain_mb * MIB
    files = check_files(run)
    kept_hours = files.pop("kept_hours")
    graph = check_graph(run)
    summaries = check_summaries(run)
    queries = check_queries(run, kept_hours, cli=cli)
    sim_hours = {hour_file_name(START + h * HOUR_S)[:-6] for h in range(int(c.days * 24))}
    settled_max = max(s.log_bytes for s in run.samples)
    last = run.samples[-1]
    oldest_allowed = run.end - c.retain_days * DAY_S - HOUR_S
    checks = {
        "nothing_lost_by_the_writer": run.written == run.envelopes and run.failed == 0,
        "one_file_per_hour": sim_hours <= run.hours_seen and files["misplaced_lines"] == 0,
        "kept_hours_complete": not files["hours_with_wrong_count"] and files["contiguous"],
        "disk_under_limit_at_every_sample": settled_max <= limit,
        "retention_by_age": bool(run.deleted_age)
        and all(h * HOUR_S >= oldest_allowed for h in kept_hours),
        "retention_by_size": bool(run.deleted_size),
        "closed_hours_compressed": not c.compress or last.plain <= 2 + run.late_plain_parts,
        "queries_during_maintenance_right": run.reader_wrong == 0 and not run.reader_errors,
        "task_archive_moves_finished": graph["archived"] > 0
        and graph["in_both"] == graph["in_neither"] == graph["archived_unfinished"] == 0
        and graph["finished_overdue_in_graph"] == 0,
        "summaries_kept_up": not summaries["behind"] and not summaries["wrong_turn_counts"],
        "queries_answer": all(q["ok"] for q in queries),
    }
    checks["ok"] = all(checks.values())
    return {
        "benchmark": "retention",
        "checks": checks,
        "config": asdict(c),
        "simulated": {
            "start": hour_file_name(run.start)[:-6],
            "days": c.days,
            "envelopes": run.envelopes,
            "late_envelopes": run.expected.late,
            "envelopes_per_s_simulated": round(run.envelopes / (c.days * DAY_S), 2),
            "bytes_per_envelope": round(run.samples[0].log_bytes / run.samples[0].envelopes, 1),
            "wall_s": round(run.wall_s, 1),
        },
        "disk": {
            "limit_bytes": int(limit),
            "max_settled_bytes": settled_max,
            "max_unsettled_bytes": run.max_unsettled_bytes,
            "final_bytes": last.log_bytes,
            "samples": len(run.samples),
        },
        "rotation": {"hours_simulated": len(sim_hours), "hour_files_seen": len(run.hours_seen)},
        "retention": {
            "deleted_by_age": len(run.deleted_age),
            "deleted_for_size": len(run.deleted_size),
            **files,
        },
        "compression": {
            "final_plain_files": last.plain,
            "final_gz_files": last.gz,
            "late_plain_parts_seen": run.late_plain_parts,
        },
        "task_graph": graph,
        "summaries": summaries,
        "reader": {
            "queries": run.reader_queries,
            "wrong": run.reader_wrong,
            "errors": run.reader_errors,
        },
        "queries": queries,
        "samples": [asdict(s) for s in run.samples],
    }


def plot(result: dict[str, Any], name: str, quick: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    days = [s["t_h"] / 24 for s in samples]
    limit = result["disk"]["limit_bytes"] / MIB
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=[3, 2])
    top.plot(days, [s["log_bytes"] / MIB for s in samples], label="data/logs (all files)")
    top.axhline(limit, color="red", linestyle="--", label=f"retain_mb = {limit:g} MiB")
    c = result["config"]
    top.axvline(
        c["retain_days"], color="grey", linestyle=":", label=f"retain_days = {c['retain_days']:g}"
    )
    top.axvline(c["ramp_from_day"], color="orange", linestyle=":", label=f"traffic x{c['ramp']:g}")
    top.set_ylabel("MiB on disk")
    sim = result["simulated"]
    top.set_title(
        f"A simulated week: {sim['envelopes']:,} envelopes ({sim['envelopes_per_s_simulated']:g}/s), "
        f"checks {'all held' if result['checks']['ok'] else 'FAILED'}"
    )
    top.legend(fontsize=8, loc="upper left")
    bottom.plot(days, [s["graph_nodes"] for s in samples], label="live task graph nodes")
    bottom.set_ylabel("nodes")
    twin = bottom.twinx()
    twin.plot(
        days,
        [s["archive_bytes"] / MIB for s in samples],
        color="green",
        label="tasks.archive.jsonl",
    )
    twin.set_ylabel("archive MiB")
    bottom.set_xlabel("simulated days")
    bottom.legend(fontsize=8, loc="upper left")
    twin.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = save_plot(fig, name, quick=quick)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages; results/quick/")
    parser.add_argument("--keep", metavar="DIR", help="simulate into DIR and keep it")
    parser.add_argument("--days", type=float, help="simulate this many days (default 7)")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    config = QUICK if args.quick else FULL
    if args.days:
        config = replace(config, days=args.days)
    # in memory where there is a tmpfs: retention keeps it small, and fsync costs nothing
    shm = Path("/dev/shm")
    tmp = tempfile.mkdtemp(prefix="chorus-week-", dir=shm if shm.is_dir() else None)
    root = Path(args.keep) if args.keep else Path(tmp)
    try:
        if args.keep and root.exists():
            shutil.rmtree(root)
        run = simulate(config, root, progress=True)
        print(f"simulated in {run.wall_s:.0f} s; checking", file=sys.stderr)
        result = evaluate(run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["quick"] = args.quick
    result["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    path = write_json("retention", result, quick=args.quick)
    plot(result, "retention", args.quick)
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "config")}, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0 if result["checks"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
