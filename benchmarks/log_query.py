"""How fast ``python -m runtime logs`` answers a topic + one-hour query over a day of log,
against ``grep -F … | jq`` over the same files.

Generates a simulated day (yesterday, UTC) of bus traffic — 1,000,000 envelopes
(``--quick``: 100,000) built from ``runtime.messages`` Structs and written by the real
:class:`~orchestrator.log.writer.LogWriter` (24 hour files, minute indexes) — then
times, each as a fresh process, so start-up counts:

- chorus: ``python -m orchestrator.log.query --topic task. --since A --until B --json``
- grep_jq: ``grep -h -F '"topic":"task.' FILES | jq -c 'select(.ts >= A and .ts < B)'``
  over exactly the files Chorus picked by name.

Both must print the same number of lines. The chorus runs with bytecode caching on
(under a temp ``PYTHONPYCACHEPREFIX``), as an installed command does. The headline case is the hour from 12:30 to
13:30 (it spans two files; Chorus reads half of each through the minute index); the
hour-aligned case (12:00–13:00, one file, where the index cannot help) and the
unaligned case with the indexes hidden are recorded too. Each command runs once to warm
the page cache, then ``--repeat`` times; the median counts.

Run: ``.venv/bin/python benchmarks/log_query.py`` (needs ``jq``: ``apt-get install -y
jq``). Writes ``benchmarks/results/log_query.json`` and ``.png`` (``--quick``: under
``benchmarks/results/quick/``). Wall time on 2 busy cores: about 40 s in all
(generating the day about 20 s), ``--quick`` about 8 s. Measured there: ratio 1.36
(12:30–13:30), 1.19 (aligned hour), 1.39 (no index). With ``--quick`` the hour files
are 1 MB and Python's start-up (about 60 ms, against jq's 25 ms) decides: ratio ~0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.log.layout import HOUR_S, list_log_files  # noqa: E402
from orchestrator.log.writer import LogWriter  # noqa: E402
from runtime import messages as m  # noqa: E402

DAY_S = 86400
PREFIX = "task."
AGENTS = ("coder", "search", "rag")
PROCESSES = ("controller", "narrator", "coder", "search", "rag", "engine")


def traffic(n: int, start: float, seed: int = 7) -> list[tuple[str, str, m.Body]]:
    """``n`` (topic, sender, body) triples in a plausible day's mix: mostly heartbeats
    and narrator chunks, about 11% task traffic."""
    rng = random.Random(seed)
    kinds = [
        ("heartbeat", 0.45),
        ("chunk", 0.25),
        ("stats", 0.08),
        ("update", 0.08),
        ("assign", 0.03),
        ("cue", 0.03),
        ("decision", 0.03),
        ("turn", 0.02),
        ("note", 0.02),
        ("rejected", 0.01),
    ]
    names = [k for k, _ in kinds]
    weights = [w for _, w in kinds]
    out: list[tuple[str, str, m.Body]] = []
    for i, kind in enumerate(rng.choices(names, weights, k=n)):
        agent = AGENTS[i % 3]
        task = f"task-{i // 50}"
        if kind == "heartbeat":
            who = PROCESSES[i % len(PROCESSES)]
            out.append((f"heartbeat.{who}", who, m.Heartbeat(state="idle", pid=1000 + i % 6)))
        elif kind == "chunk":
            chunk = m.Chunk(stream=f"s{i // 40}", seq=i % 40, delta=f" word{i % 997}")
            out.append(("user.out", "narrator", chunk))
        elif kind == "stats":
            stats = m.EngineStats(
                tokens_per_s=40 + i % 20,
                sessions=2,
                active_requests=i % 3,
                cache_fill=(i % 100) / 100,
                device="cpu",
                resident_mb=512.0,
            )
            out.append(("engine.stats", "engine", stats))
        elif kind == "update":
            update = m.TaskUpdate(task=task, state="progress", message=f"step {i % 9}")
            out.append(("task.update", agent, update))
        elif kind == "assign":
            assign = m.TaskAssign(task=task, kind=agent, text=f"look into item {i}")
            out.append((f"task.assign.{agent}", "controller", assign))
        elif kind == "cue":
            cue = m.Cue(speak_now=i % 2 == 0, priority=i % 3, reason="result ready")
            out.append(("narrator.cue", "controller", cue))
        elif kind == "decision":
            out.append(("narrator.decision", "narrator", m.Decision(action="spoken", reason="cue")))
        elif kind == "turn":
            out.append(("user.in", "client", m.UserTurn(text=f"please check {i}")))
        elif kind == "note":
            out.append((f"event.{agent}", agent, m.Note(name="tool", data={"ms": i % 500})))
        else:
            rejected = m.Rejected(sender="client", topic="user.out", reason="not allowed")
            out.append(("sys.rejected", "broker", rejected))
    return out


def generate(log_dir: Path, n: int, start: float) -> float:
    """Write ``n`` envelopes spread over the day from ``start``; returns seconds taken."""
    began = time.perf_counter()
    writer = LogWriter(log_dir)
    writer.start()
    step = DAY_S / n
    for i, (topic, sender, body) in enumerate(traffic(n, start)):
        writer.append(
            m.Envelope(
                id=f"{sender}-{i}",
                topic=topic,
                sender=sender,
                ts=start + i * step,
                seq=i,
                body=body,  # type: ignore[arg-type]
                conversation=f"conv-{i // 5000}",
                task=f"task-{i // 50}" if topic.startswith("task.") else None,
            )
        )
    writer.close()
    assert writer.written == n and writer.failed == 0, (writer.written, writer.last_error)
    writer.maintain()  # index every hour now that all are closed
    return time.perf_counter() - began


def cli_env(pycache: Path) -> dict[str, str]:
    """The environment of an installed CLI: bytecode is cached (under ``pycache``, so the
    checkout stays clean) and the warm-up run fills that cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def timed(
    command: list[str] | str,
    repeat: int,
    shell: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[float, int]:
    """Median wall seconds over ``repeat`` runs (after one warm-up) and the line count."""
    lines = -1
    times = []
    for i in range(repeat + 1):
        began = time.perf_counter()
        result = subprocess.run(
            command, shell=shell, capture_output=True, check=True, cwd=REPO, env=env
        )
        elapsed = time.perf_counter() - began
        count = result.stdout.count(b"\n")
        assert lines in (-1, count), "a command gave different answers"
        lines = count
        if i:
            times.append(elapsed)
    return statistics.median(times), lines


def measure(
    data_dir: Path, since: float, until: float, repeat: int, env: dict[str, str]
) -> dict[str, Any]:
    """Time both commands for one window; their line counts must agree."""
    files = [f.path for f in list_log_files(data_dir / "logs", since, until)]
    chorus_cmd = [
        sys.executable,
        "-m",
        "orchestrator.log.query",
        "--data-dir",
        str(data_dir),
        "--topic",
        PREFIX,
        "--since",
        repr(since),
        "--until",
        repr(until),
        "--oldest",
        "--json",
    ]
    needle = shlex.quote(f'"topic":"{PREFIX}')
    select = shlex.quote(f"select(.ts >= {since!r} and .ts < {until!r})")
    baseline = (
        f"grep -h -F {needle} {' '.join(shlex.quote(str(f)) for f in files)} | jq -c {select}"
    )
    chorus_s, chorus_lines = timed(chorus_cmd, repeat, env=env)
    grep_jq_s, grep_lines = timed(baseline, repeat, shell=True)
    assert chorus_lines == grep_lines, f"chorus {chorus_lines} lines, grep|jq {grep_lines}"
    return {
        "since": since,
        "until": until,
        "files": [f.name for f in files],
        "bytes_in_files": sum(f.stat().st_size for f in files),
        "chorus_s": round(chorus_s, 4),
        "grep_jq_s": round(grep_jq_s, 4),
        "ratio": round(grep_jq_s / chorus_s, 3),
        "lines": chorus_lines,
        "chorus_command": shlex.join(chorus_cmd),
        "grep_jq_command": baseline,
    }


def without_indexes(data_dir: Path) -> list[tuple[Path, Path]]:
    """Hide the minute indexes; returns what to move back."""
    moved = []
    for idx in (data_dir / "logs").glob("*.idx"):
        hidden = idx.with_name(idx.name + ".hidden")
        idx.rename(hidden)
        moved.append((hidden, idx))
    return moved


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    labels, chorus, grep_jq = [], [], []
    for name, case in cases.items():
        labels.append(name.replace("_", "\n"))
        chorus.append(case["chorus_s"] * 1000)
        grep_jq.append(case["grep_jq_s"] * 1000)
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar([x - 0.2 for x in xs], chorus, width=0.4, label="chorus (python -m …query)")
    ax.bar([x + 0.2 for x in xs], grep_jq, width=0.4, label="grep -F | jq")
    for x, c, g in zip(xs, chorus, grep_jq, strict=True):
        ax.text(x - 0.2, c, f"{c:.0f}", ha="center", va="bottom", fontsize=8)
        ax.text(x + 0.2, g, f"{g:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("wall ms, whole process (median)")
    ax.set_title(
        f"topic '{PREFIX}' + one hour, over {results['envelopes']:,} envelopes in a day "
        f"(ratio {results['ratio']:.2f}×)"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k envelopes, results/quick/")
    parser.add_argument("--envelopes", type=int, help="how many envelopes to generate")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per command")
    parser.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it")
    args = parser.parse_args(argv)
    if shutil.which("jq") is None or shutil.which("grep") is None:
        print("error: the baseline needs grep and jq (apt-get install -y jq)", file=sys.stderr)
        return 2
    n = args.envelopes or (100_000 if args.quick else 1_000_000)
    out_dir = REPO / "benchmarks" / "results" / ("quick" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    day = float((int(time.time()) // DAY_S - 1) * DAY_S)  # yesterday, UTC: retention keeps it
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="chorus-bench-"))
    try:
        logs = work / "logs"
        if logs.exists():
            shutil.rmtree(logs)
        generate_s = generate(logs, n, day)
        print(f"generated {n:,} envelopes in {generate_s:.1f}s", file=sys.stderr)
        noon = day + 12 * HOUR_S
        env = cli_env(work / "pycache")
        half_past = (noon + 1800.0, noon + 1800.0 + HOUR_S)
        cases = {
            "12:30-13:30": measure(work, *half_past, args.repeat, env),
            "12:00-13:00_aligned": measure(work, noon, noon + HOUR_S, args.repeat, env),
        }
        hidden = without_indexes(work)
        try:
            cases["12:30-13:30_no_index"] = measure(work, *half_past, args.repeat, env)
        finally:
            for src, dst in hidden:
                src.rename(dst)
        head = cases["12:30-13:30"]
        log_bytes = sum(f.path.stat().st_size for f in list_log_files(logs))
        results: dict[str, Any] = {
            "benchmark": "log_query",
            "query": f"--topic {PREFIX} --since 12:30 --until 13:30 (one hour), --json",
            "chorus_s": head["chorus_s"],
            "grep_jq_s": head["grep_jq_s"],
            "ratio": head["ratio"],
            "chorus_lines": head["lines"],
            "grep_jq_lines": head["lines"],
            "envelopes": n,
            "log_files": len(list_log_files(logs)),
            "log_bytes": log_bytes,
            "generate_s": round(generate_s, 2),
            "repeat": args.repeat,
            "cases": cases,
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                "platform": platform.platform(),
                "jq": subprocess.run(
                    ["jq", "--version"], capture_output=True, text=True, check=False
                ).stdout.strip(),
            },
        }
        (out_dir / "log_query.json").write_bytes(
            msgspec.json.format(msgspec.json.encode(results), indent=2) + b"\n"
        )
        plot(results, out_dir / "log_query.png")
        print(json.dumps({k: v for k, v in results.items() if k != "cases"}, indent=2))
        for name, case in cases.items():
            print(
                f"{name:>22}: chorus {case['chorus_s'] * 1000:7.1f} ms   "
                f"grep|jq {case['grep_jq_s'] * 1000:7.1f} ms   "
                f"ratio {case['ratio']:.2f}   lines {case['lines']}",
                file=sys.stderr,
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
