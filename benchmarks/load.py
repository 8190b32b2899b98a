"""Load: N concurrent conversations through the HTTP gateway and through the bus, and a
soak mode that watches memory and file descriptors for growth.

    .venv/bin/python -m benchmarks.load                 # N = 1, 4, 16, 64 (about 20 min here)
    .venv/bin/python -m benchmarks.load --quick         # N = 1, 4, 16 (about 5 min)
    .venv/bin/python -m benchmarks.load --soak 3600     # an hour of steady load

Starts the whole system as an operator would, in a temporary data directory:
``python -m runtime launch`` (broker and its log writer, engine with the default model,
controller, narrator, coder, search, rag) and ``python -m runtime serve`` (the gateway,
chat rate limit off) as child processes (``benchmarks/_system.py``, shared with the
fault harness). RAG uses BM25 so no vector index is built.

For each N, N conversations run at once, closed loop (each sends its next turn when the
last one closed), first all through the gateway (``POST /v1/chat``, Server-Sent Events),
then all through the bus (``runtime.connect``, ``Connection.chat``). Turns alternate
between *short* (small talk: the narrator answers, one stream of at most 96 tokens) and
*long* (a documentation question: routed to the search agent, an acknowledgement, the
search, then the narrator's result with sources: two streams, more bus traffic).
Recorded per N, for both paths together and for each:

* turn latency ``p50_s`` / ``p95_s`` / ``p99_s``: from sending the turn to the chunk
  that closes it (``closes_turn``), as the client sees it;
* ``errors``: turns that timed out (``TURN_TIMEOUT_S``), got an HTTP error or an SSE
  ``error``, or ended with ``finish: error`` (the model could not answer: the user got
  the engine-down notice instead);
* ``tok_s``: the engine's aggregate tokens/s, the mean of its ``engine.stats`` reports
  on the bus during the phase (``tok_s_rpc``: tokens generated ÷ seconds, from the
  engine's ``stats`` call, as a check);
* ``broker_msg_s``: envelopes the broker forwarded per second (a monitor subscribed to
  everything counts them);
* ``rss_mb_peak``: the resident memory of every process (sampled each second with
  psutil; the series is in ``memory``).

The knee is the first N whose p95 is more than ``KNEE_FACTOR`` times the p95 of the N
before it (latency growing at least half as fast as the load), or whose turns start to
fail; ``knee_n`` is null when neither happens.

``--soak SECONDS`` runs ``SOAK_CONVERSATIONS`` conversations (half through the gateway,
half through the bus; each starts a new conversation every ``SOAK_ROTATE`` turns) for
that long, sampling every process's RSS and open file descriptors, and reports their
growth after the warm-up (target: none) in ``soak.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import numpy as np
import psutil

from benchmarks._common import percentile, save_plot, write_json
from benchmarks._system import System
from runtime import messages as m
from runtime.embed import Connection, connect
from runtime.gateway.feeds import read_sse
from runtime.paths import DataDir

TURN_TIMEOUT_S = 300.0  # the gateway's own answer timeout; a turn past it is an error
KNEE_FACTOR = 2.0
SOAK_CONVERSATIONS = 4
SOAK_ROTATE = 10
SHORT = ["hello!", "thanks!", "good morning!", "how are you?", "hi there"]
LONG = [
    "Where is the assert statement documented?",
    "Where is the with statement documented?",
    "Find the section about list comprehensions.",
    "Where is the yield expression documented?",
    "Which section documents the global statement?",
]


class Sampler:
    """RSS and open file descriptors of every process, every ``interval`` seconds, from
    a thread (psutil calls block)."""

    def __init__(self, system: System, interval: float) -> None:
        self.system = system
        self.interval = interval
        self.t0 = time.monotonic()
        self.samples: dict[str, list[tuple[float, float, int]]] = {}  # role -> (t, MiB, fds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self.t0
            for role, proc in {"load-client": psutil.Process(), **self.system.processes()}.items():
                try:
                    rss = proc.memory_info().rss / 2**20
                    fds = proc.num_fds()
                except psutil.Error:
                    continue
                self.samples.setdefault(role, []).append((now, rss, fds))
            self._stop.wait(self.interval)

    def peak_mb(self, start: float, end: float) -> dict[str, float]:
        return {
            role: round(max(mb for t, mb, _ in rows if start <= t <= end), 1)
            for role, rows in sorted(self.samples.items())
            if any(start <= t <= end for t, _, _ in rows)
        }


@dataclass
class BusWatch:
    """Every envelope the broker forwards (seen as ``monitor``), and ``engine.stats``."""

    t0: float
    arrivals: list[float] = field(default_factory=list)
    stats: list[tuple[float, float]] = field(default_factory=list)  # (t, tokens/s)
    dropped: int = 0

    async def run(self, conn: Connection) -> None:
        async with conn.bus("monitor") as monitor:
            sub = monitor.subscribe("", buffer=1_000_000)
            try:
                async for envelope in sub:
                    now = time.monotonic() - self.t0
                    self.arrivals.append(now)
                    if isinstance(envelope.body, m.EngineStats):
                        self.stats.append((now, envelope.body.tokens_per_s))
            finally:
                self.dropped = sub.dropped

    def msg_s(self, start: float, end: float) -> float:
        a = np.asarray(self.arrivals)
        return float(((a >= start) & (a <= end)).sum() / max(end - start, 1e-9))

    def tok_s(self, start: float, end: float) -> float:
        rates = [r for t, r in self.stats if start <= t <= end + 2.0]  # reports lag ≤ 2 s
        return float(np.mean(rates)) if rates else 0.0


# -- turns ----------------------------------------------------------------------------------


@dataclass
class Turn:
    """One user turn as the client saw it."""

    path: str  # gateway | bus
    kind: str  # short | long
    latency_s: float = float("nan")  # to the chunk that closed the turn
    first_s: float = float("nan")  # to the first chunk with text
    error: str = ""
    notice: bool = False  # a playbook notice was part of the answer


async def gateway_turn(
    client: httpx.AsyncClient, text: str, conversation: str | None, turn: Turn
) -> str | None:
    """One turn over ``POST /v1/chat``; returns the conversation id the gateway gave."""
    started = time.perf_counter()
    body: dict[str, Any] = {"text": text}
    if conversation is not None:
        body["conversation"] = conversation
    try:
        with anyio.fail_after(TURN_TIMEOUT_S + 10):
            async with client.stream("POST", "/v1/chat", json=body) as response:
                if response.status_code != 200:
                    turn.error = f"HTTP {response.status_code}"
                    return conversation
                conversation = response.headers["x-chorus-conversation"]
                async for event, data in read_sse(response.aiter_lines()):
                    if event == "chunk":
                        if turn.first_s != turn.first_s:
                            turn.first_s = time.perf_counter() - started
                        turn.notice |= bool(data["notice"])
                    elif event == "final":
                        if data["finish"] == "error":
                            turn.error = "finish error"
                        if data["closes_turn"]:
                            turn.latency_s = time.perf_counter() - started
                            return conversation
                    elif event in ("interrupted", "error"):
                        turn.error = data.get("error", event)
                        return conversation
                turn.error = turn.error or "stream ended early"
    except TimeoutError:
        turn.error = "timeout"
    except httpx.HTTPError as exc:
        turn.error = f"{type(exc).__name__}: {exc}"
    return conversation


async def bus_turn(conn: Connection, text: str, conversation: str, turn: Turn) -> None:
    """One turn over the bus with ``Connection.chat``."""
    started = time.perf_counter()
    try:
        with anyio.fail_after(TURN_TIMEOUT_S):
            async for chunk in conn.chat(text, conversation=conversation):
                if chunk.delta and turn.first_s != turn.first_s:
                    turn.first_s = time.perf_counter() - started
                turn.notice |= chunk.notice
                if chunk.final and chunk.finish == "error":
                    turn.error = "finish error"
                if chunk.final and chunk.finish == "interrupted":
                    turn.error = "interrupted"
                if chunk.final and chunk.closes_turn:
                    turn.latency_s = time.perf_counter() - started
                    return
            turn.error = turn.error or "stream ended early"
    except TimeoutError:
        turn.error = "timeout"


@dataclass
class Clients:
    """How the load reaches the system: an HTTP client and a bus connection."""

    http: httpx.AsyncClient
    conn: Connection


async def conversation(
    clients: Clients,
    path: str,
    index: int,
    turns: Callable[[], bool],
    out: list[Turn],
    rotate: int = 0,
) -> None:
    """One closed-loop conversation: the next turn goes when the last one closed, for as
    long as ``turns()`` says; a new conversation every ``rotate`` turns (0: never)."""
    gateway_id: str | None = None
    bus_id = f"load-{path}-{index}-{m.new_id()[:8]}"
    k = 0
    while turns():
        if rotate and k and k % rotate == 0:
            gateway_id, bus_id = None, f"load-{path}-{index}-{m.new_id()[:8]}"
        kind = "short" if (index + k) % 2 == 0 else "long"
        text = (SHORT if kind == "short" else LONG)[(index + k) % 5]
        turn = Turn(path, kind)
        if path == "gateway":
            gateway_id = await gateway_turn(clients.http, text, gateway_id, turn)
        else:
            await bus_turn(clients.conn, text, bus_id, turn)
        out.append(turn)
        k += 1


def summarize_turns(turns: Sequence[Turn]) -> dict[str, Any]:
    ok = [t.latency_s for t in turns if not t.error]
    firsts = [t.first_s for t in turns if t.first_s == t.first_s]
    return {
        "turns": len(turns),
        "p50_s": round(percentile(ok, 50), 2),
        "p95_s": round(percentile(ok, 95), 2),
        "p99_s": round(percentile(ok, 99), 2),
        "first_chunk_p50_s": round(percentile(firsts, 50), 2),
        "errors": sum(1 for t in turns if t.error),
        "notices": sum(1 for t in turns if t.notice),
    }


def knee(levels: dict[str, dict[str, Any]]) -> int | None:
    """The first N whose p95 is over ``KNEE_FACTOR`` × the previous N's, or with errors."""
    previous = None
    for key, level in levels.items():
        if level["errors"] > 0:
            return int(key)
        if previous is not None and level["p95_s"] > KNEE_FACTOR * previous:
            return int(key)
        previous = level["p95_s"]
    return None


# -- the load run ---------------------------------------------------------------------------


async def engine_tokens(data: DataDir) -> int:
    from engine.client import Client

    async with Client.connect("operator", data.root, timeout=30) as llm:
        return (await llm.stats()).tokens_generated


async def run_levels(
    system: System, levels: list[int], turns_at: Callable[[int], int]
) -> dict[str, Any]:
    data = system.data
    headers = {"Authorization": f"Bearer {system.token}"}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    timeout = httpx.Timeout(30, read=None)
    sampler = Sampler(system, interval=1.0)
    watch = BusWatch(sampler.t0)
    phases: list[dict[str, Any]] = []
    per_n: dict[str, dict[str, Any]] = {}
    with sampler:
        async with (
            connect(data.root) as conn,
            httpx.AsyncClient(
                base_url=system.url, headers=headers, limits=limits, timeout=timeout
            ) as http,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(watch.run, conn)
            clients = Clients(http, conn)
            # not counted: the first forward passes pay for allocation and caches
            await bus_turn(conn, SHORT[0], "warm-up", Turn("bus", "short"))
            await gateway_turn(http, LONG[0], None, Turn("gateway", "long"))
            print(f"warm-up done at {time.monotonic() - sampler.t0:.0f} s", flush=True)
            for n in levels:
                level_turns: list[Turn] = []
                by_path: dict[str, dict[str, Any]] = {}
                for path in ("gateway", "bus"):
                    turns: list[Turn] = []
                    budget = {i: turns_at(n) for i in range(n)}

                    def more(i: int, budget: dict[int, int] = budget) -> Callable[[], bool]:
                        def left() -> bool:
                            budget[i] -= 1
                            return budget[i] >= 0

                        return left

                    tokens_before = await engine_tokens(data)
                    start = time.monotonic() - sampler.t0
                    async with anyio.create_task_group() as load:
                        for i in range(n):
                            load.start_soon(conversation, clients, path, i, more(i), turns)
                    end = time.monotonic() - sampler.t0
                    tokens = await engine_tokens(data) - tokens_before
                    summary = summarize_turns(turns)
                    summary |= {
                        "tok_s": round(watch.tok_s(start, end), 1),
                        "tok_s_rpc": round(tokens / (end - start), 1),
                        "broker_msg_s": round(watch.msg_s(start, end), 1),
                        "duration_s": round(end - start, 1),
                        "error_kinds": sorted({t.error for t in turns if t.error}),
                    }
                    by_path[path] = summary
                    phases.append({"n": n, "path": path, "start_s": start, "end_s": end})
                    level_turns += turns
                    print(f"N={n:<3} {path:<8} {_line(summary)}", flush=True)
                    await anyio.sleep(2)  # let stragglers (decisions, acks) pass
                starts = [p["start_s"] for p in phases if p["n"] == n]
                ends = [p["end_s"] for p in phases if p["n"] == n]
                total = summarize_turns(level_turns)
                paths = by_path.values()
                seconds = sum(p["duration_s"] for p in paths)
                per_n[str(n)] = {
                    "n": n,
                    **total,
                    "tok_s": round(sum(p["tok_s"] * p["duration_s"] for p in paths) / seconds, 1),
                    "tok_s_rpc": round(
                        sum(p["tok_s_rpc"] * p["duration_s"] for p in paths) / seconds, 1
                    ),
                    "broker_msg_s": round(
                        sum(p["broker_msg_s"] * p["duration_s"] for p in paths) / seconds, 1
                    ),
                    "short": summarize_turns([t for t in level_turns if t.kind == "short"]),
                    "long": summarize_turns([t for t in level_turns if t.kind == "long"]),
                    "gateway": by_path["gateway"],
                    "bus": by_path["bus"],
                    "rss_mb_peak": sampler.peak_mb(min(starts), max(ends)),
                }
            tg.cancel_scope.cancel()
    return {
        "per_n": per_n,
        "phases": phases,
        "monitor_dropped": watch.dropped,
        "memory": _series(sampler, step=5.0),
    }


def _line(s: dict[str, Any]) -> str:
    return (
        f"turns {s['turns']:<4} p50 {s['p50_s']:6.2f} s  p95 {s['p95_s']:6.2f} s  "
        f"p99 {s['p99_s']:6.2f} s  errors {s['errors']:<3} tok/s {s['tok_s']:5.1f}  "
        f"msg/s {s['broker_msg_s']:7.1f}"
    )


def _series(sampler: Sampler, step: float) -> dict[str, list[list[float]]]:
    """Each process's samples, thinned to one per ``step`` seconds: [t, MiB, fds]."""
    out: dict[str, list[list[float]]] = {}
    for role, rows in sorted(sampler.samples.items()):
        kept: list[list[float]] = []
        for t, mb, fds in rows:
            if not kept or t - kept[-1][0] >= step:
                kept.append([round(t, 1), round(mb, 1), fds])
        out[role] = kept
    return out


# -- soak -----------------------------------------------------------------------------------


async def run_soak(system: System, seconds: float, interval: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {system.token}"}
    sampler = Sampler(system, interval=interval)
    turns: list[Turn] = []
    with sampler:
        async with (
            connect(system.data.root) as conn,
            httpx.AsyncClient(
                base_url=system.url, headers=headers, timeout=httpx.Timeout(30, read=None)
            ) as http,
        ):
            clients = Clients(http, conn)
            await bus_turn(conn, SHORT[0], "warm-up", Turn("bus", "short"))
            deadline = time.monotonic() + seconds

            def more() -> bool:
                return time.monotonic() < deadline

            async with anyio.create_task_group() as load:
                for i in range(SOAK_CONVERSATIONS):
                    path = "gateway" if i % 2 == 0 else "bus"
                    load.start_soon(conversation, clients, path, i, more, turns, SOAK_ROTATE)
            run_s = time.monotonic() - sampler.t0
    warmup_s = max(60.0, 0.25 * run_s)
    window_s = max(30.0, 0.1 * run_s)
    measured = {role: _growth(rows, warmup_s, window_s) for role, rows in sampler.samples.items()}
    growth = {role: g for role, g in sorted(measured.items()) if g is not None}
    return {
        "seconds": round(run_s, 1),
        "interval_s": interval,
        "warmup_s": round(warmup_s, 1),
        "window_s": round(window_s, 1),
        **summarize_turns(turns),
        "processes": growth,
        "max_rss_growth_pct": max((g["rss_growth_pct"] for g in growth.values()), default=0.0),
        "max_fds_growth": max((g["fds_growth"] for g in growth.values()), default=0),
        "no_growth": all(g["ok"] for g in growth.values()),
        "samples": _series(sampler, step=interval),
    }


RSS_GROWTH_LIMIT_PCT = 5.0  # RSS may wobble this much after warm-up and count as flat


def _growth(
    rows: list[tuple[float, float, int]], warmup_s: float, window_s: float
) -> dict[str, Any] | None:
    """RSS and fds in the first window after warm-up against the last window: medians of
    each (a single sample catches in-flight requests), and the RSS trend (least squares)."""
    after = [r for r in rows if r[0] >= warmup_s]
    if len(after) < 4:
        return None
    end = after[-1][0]
    first = [r for r in after if r[0] <= warmup_s + window_s]
    last = [r for r in after if r[0] >= end - window_s]
    rss0, rss1 = float(np.median([r[1] for r in first])), float(np.median([r[1] for r in last]))
    fds0, fds1 = int(np.median([r[2] for r in first])), int(np.median([r[2] for r in last]))
    t = np.asarray([r[0] for r in after])
    slope = float(np.polyfit(t, [r[1] for r in after], 1)[0]) if np.ptp(t) > 0 else 0.0
    growth_pct = 100 * (rss1 - rss0) / rss0
    return {
        "rss_mb_start": round(rss0, 1),
        "rss_mb_end": round(rss1, 1),
        "rss_growth_pct": round(growth_pct, 2),
        "rss_slope_mb_per_h": round(slope * 3600, 1),
        "fds_start": fds0,
        "fds_end": fds1,
        "fds_growth": fds1 - fds0,
        "ok": growth_pct <= RSS_GROWTH_LIMIT_PCT and fds1 <= fds0,
    }


# -- plots ----------------------------------------------------------------------------------


def plot_load(result: dict[str, Any], quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_n = result["per_n"]
    ns = [int(k) for k in per_n]
    fig, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(11, 7.5))
    for path, style, marker in (("gateway", "-", "o"), ("bus", "--", "s")):
        for q, color in (("p50_s", "#4c72b0"), ("p95_s", "#dd8452"), ("p99_s", "#c44e52")):
            a.plot(
                ns,
                [per_n[k][path][q] for k in per_n],
                style,
                marker=marker,
                color=color,
                label=f"{path} {q[:3]}",
            )
    if result["knee_n"] is not None:
        a.axvline(result["knee_n"], color="grey", linestyle=":", label=f"knee N={result['knee_n']}")
    a.set_xscale("log", base=2)
    a.set_xticks(ns, [str(n) for n in ns])
    a.set_xlabel("concurrent conversations N")
    a.set_ylabel("turn latency, seconds")
    a.set_title("user turn → the chunk that closes it")
    a.legend(fontsize=7, ncol=2)

    width = 0.38
    x = np.arange(len(ns))
    b.bar(x - width / 2, [per_n[k]["tok_s"] for k in per_n], width, label="engine tok/s")
    b.set_xticks(x, [str(n) for n in ns])
    b.set_xlabel("N")
    b.set_ylabel("engine tokens/s (engine.stats)")
    b2 = b.twinx()
    b2.bar(
        x + width / 2,
        [per_n[k]["errors"] for k in per_n],
        width,
        color="#c44e52",
        label="errors",
    )
    b2.set_ylabel("turns with an error")
    b2.set_ylim(0, max(1, *(per_n[k]["errors"] for k in per_n)) * 1.2)
    b.set_title("engine aggregate tokens/s and errors")
    b.legend(loc="upper left", fontsize=8)
    b2.legend(loc="upper right", fontsize=8)

    c.plot(ns, [per_n[k]["broker_msg_s"] for k in per_n], marker="o")
    c.set_xscale("log", base=2)
    c.set_xticks(ns, [str(n) for n in ns])
    c.set_xlabel("N")
    c.set_ylabel("envelopes/s")
    c.set_ylim(bottom=0)
    c.set_title("broker: envelopes forwarded per second")

    colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    for i, (role, rows) in enumerate(result["memory"].items()):
        if rows:
            d.plot([r[0] for r in rows], [r[1] for r in rows], label=role, color=colors[i % 20])
    for phase in result["phases"]:
        if phase["path"] == "gateway":
            d.axvline(phase["start_s"], color="grey", linewidth=0.5)
            d.text(phase["start_s"], d.get_ylim()[1], f"N={phase['n']}", fontsize=7, va="top")
    d.set_xlabel("seconds")
    d.set_ylabel("RSS, MiB")
    d.set_yscale("log")
    d.set_title("resident memory of each process")
    d.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_plot(fig, "load", quick=quick)


def plot_soak(result: dict[str, Any], quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    for i, (role, rows) in enumerate(result["samples"].items()):
        a.plot([r[0] for r in rows], [r[1] for r in rows], label=role, color=colors[i % 20])
        b.plot([r[0] for r in rows], [r[2] for r in rows], label=role, color=colors[i % 20])
    for ax in (a, b):
        ax.axvspan(0, result["warmup_s"], color="grey", alpha=0.15, label="warm-up")
        ax.set_xlabel("seconds")
    a.set_yscale("log")
    a.set_ylabel("RSS, MiB")
    a.set_title(f"RSS (max growth after warm-up {result['max_rss_growth_pct']}%)")
    b.set_ylabel("open file descriptors")
    b.set_title(f"file descriptors (max growth {result['max_fds_growth']})")
    a.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_plot(fig, "soak", quick=quick)


# -- main -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, data: DataDir) -> dict[str, Any]:
    """Start the system in ``data``, run the levels or the soak, stop it."""
    started = time.perf_counter()
    # BM25 only: building the dense index of the corpus takes minutes on 2 cores; no
    # rate limit: the load is the point
    system = System(data, env={"CHORUS_RAG_METHOD": "bm25"}, gateway_args=("--rate-limit", "0"))
    try:
        await system.start()
        print(f"system up in {time.perf_counter() - started:.0f} s", flush=True)
        if args.soak:
            interval = 5.0 if args.soak >= 600 else 2.0
            return await run_soak(system, args.soak, interval)
        levels = args.levels or ([1, 4, 16] if args.quick else [1, 4, 16, 64])
        # at least this many turns per path at every N: N = 1 and 4 run several rounds,
        # larger N one turn per conversation
        turns = 4 if args.quick else 16

        def turns_at(n: int) -> int:
            return max(1, -(-turns // n))

        return await run_levels(system, levels, turns_at)
    finally:
        await system.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="N = 1, 4, 16; results to benchmarks/results/quick/"
    )
    parser.add_argument("--levels", type=int, nargs="+", help="the Ns to run (default 1 4 16 64)")
    parser.add_argument(
        "--soak", type=float, metavar="SECONDS", help="soak mode: steady load for SECONDS"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chorus-load-") as tmp:
        result = anyio.run(run, args, DataDir(Path(tmp) / "data"))
    result = {"quick": args.quick, "wall_s": round(time.perf_counter() - started, 1)} | result
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if args.soak:
        result["targets"] = {"rss_growth_pct": RSS_GROWTH_LIMIT_PCT, "fds_growth": 0}
        path = write_json("soak", result, quick=args.quick)
        shown = {k: v for k, v in result.items() if k not in ("samples",)}
        print(json.dumps(shown, indent=1))
        plot_soak(result, args.quick)
    else:
        result["knee_n"] = knee(result["per_n"])
        result["knee_rule"] = (
            f"the first N whose p95 is over {KNEE_FACTOR:g}x the previous N's, "
            "or whose turns start to fail"
        )
        result["turn_timeout_s"] = TURN_TIMEOUT_S
        path = write_json("load", result, quick=args.quick)
        for key, level in result["per_n"].items():
            print(f"N={key:<3} all      {_line(level)}")
        print(f"knee: N={result['knee_n']}")
        plot_load(result, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
