"""A simulated week through the real log writer, task graph and summaries, at a low rate
(``benchmarks/retention.py`` runs the same at a high one): rotation, retention by age
and size, compression, the task archive, summaries and queries all hold.

Nothing here depends on timing: the clock is simulated, and each sample is taken once the
writer has settled (everything appended is written, no maintenance pass is due).
"""

from __future__ import annotations

import bisect
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.retention import WeekConfig, WeekRun, evaluate, simulate
from orchestrator.log.layout import hour_file_name, list_log_files
from orchestrator.log.query import LogQuery, query_lines
from orchestrator.log.retention import MIB, compress_closed
from orchestrator.log.writer import LogWriter
from orchestrator.task_graph import ARCHIVE_EVERY_S, TaskGraph
from runtime import messages as m

REPO = Path(__file__).resolve().parents[2]

TINY = WeekConfig(
    heartbeat_s=600.0,
    stats_s=1800.0,
    turns_per_hour=1.5,
    chunks_per_answer=4,
    late_per_hour=1,
    conversations=6,
    retain_days=3.0,
    retain_mb=0.3,
    task_retain_s=6 * 3600,
    sample_every_s=2 * 3600,
    summarize_every_s=3 * 3600,
)


@pytest.fixture(scope="module")
def week() -> Iterator[tuple[WeekRun, dict[str, Any]]]:
    # in memory where there is a tmpfs: thousands of fsynced graph writes cost nothing there
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="chorus-week-", dir=shm if shm.is_dir() else None))
    try:
        run = simulate(TINY, root)
        yield run, evaluate(run, cli=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_writer_loses_nothing_and_rotates_hourly(week: tuple[WeekRun, dict[str, Any]]) -> None:
    run, result = week
    checks = result["checks"]
    assert run.failed == 0 and run.written == run.envelopes > 5000
    assert checks["one_file_per_hour"], result["rotation"]
    assert result["rotation"]["hour_files_seen"] == 7 * 24
    # every hour kept holds exactly the lines generated for it, and only those
    assert checks["kept_hours_complete"], result["retention"]


def test_disk_use_stays_under_the_limit_and_both_retentions_act(
    week: tuple[WeekRun, dict[str, Any]],
) -> None:
    run, result = week
    limit = TINY.retain_mb * MIB
    over = [s for s in run.samples if s.log_bytes > limit]
    assert not over, over[:3]
    assert len(run.samples) == 7 * 12
    assert run.deleted_age and run.deleted_size, result["retention"]
    assert result["checks"]["retention_by_age"]
    # the traffic triples after four days: the size limit decides then, not the age limit
    assert result["retention"]["hours_kept"] < 3 * 24


def test_closed_hours_are_compressed(week: tuple[WeekRun, dict[str, Any]]) -> None:
    run, result = week
    last = run.samples[-1]
    assert result["checks"]["closed_hours_compressed"]
    assert last.gz > 10 and last.plain <= 2 + run.late_plain_parts


def test_queries_right_while_maintenance_moves_files(week: tuple[WeekRun, dict[str, Any]]) -> None:
    _, result = week
    assert result["checks"]["queries_during_maintenance_right"], result["reader"]
    failed = [q for q in result["queries"] if not q["ok"]]
    assert not failed, failed


def test_the_task_archive_keeps_the_live_graph_small(
    week: tuple[WeekRun, dict[str, Any]],
) -> None:
    run, result = week
    graph = result["task_graph"]
    assert result["checks"]["task_archive_moves_finished"], graph
    assert graph["archived"] > 0.8 * graph["tasks"]
    assert graph["in_both"] == graph["in_neither"] == 0
    # at every sample the graph held only tasks created within the retention before its
    # last write (plus the hour between archive passes and a task's length), and the
    # ones never finished
    tasks = TaskGraph(run.data.task_graph)
    created = sorted(n.created for n in [*tasks.archived(), *tasks.read().nodes.values()])
    window = TINY.task_retain_s + ARCHIVE_EVERY_S + 180
    for sample in run.samples:
        t = sample.graph_updated
        recent = bisect.bisect_right(created, t) - bisect.bisect_left(created, t - window)
        assert sample.graph_nodes <= recent + len(run.expected.stuck), sample


def test_summaries_keep_up(week: tuple[WeekRun, dict[str, Any]]) -> None:
    _, result = week
    summaries = result["summaries"]
    assert result["checks"]["summaries_kept_up"], summaries
    assert summaries["conversations"] == TINY.conversations
    assert summaries["methods"] == {"extractive": TINY.conversations}


def test_the_logs_command_answers_over_what_is_kept(week: tuple[WeekRun, dict[str, Any]]) -> None:
    """As a process, ``runtime logs`` finds every line of a task from the last hour."""
    run, _ = week
    stuck = run.expected.stuck[0]
    want = sum(n for (task, _), n in run.expected.per_task.items() if task == stuck)
    command = ["logs", "--data-dir", str(run.data.root), "--task", stuck, "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "runtime", *command],
        capture_output=True,
        check=True,
        cwd=REPO,
        timeout=60,
    ).stdout.splitlines()
    assert len(out) == want > 0


def test_settle_waits_for_the_pass_a_new_hour_asks_for(tmp_path: Path) -> None:
    """settle() returns only once what was appended is written and the pass it set off
    (a new hour, a log over its size) has run."""
    now = [1736121600.0]
    writer = LogWriter(tmp_path, flush_s=0, retain_mb=0.001, compress=True, clock=lambda: now[0])
    writer.start()
    try:
        for hour in range(3):
            now[0] = 1736121600.0 + hour * 3600 + 1000
            for i in range(50):
                body = m.Heartbeat(state="idle", pid=i)
                writer.append(
                    m.Envelope(
                        id=f"hb-{hour}-{i}",
                        topic="heartbeat.coder",
                        sender="coder",
                        ts=now[0] + i,
                        seq=i,
                        body=body,
                    )
                )
            assert writer.settle(timeout=30)
            assert writer.written == 50 * (hour + 1)
            # over the tiny limit: every older hour is gone, only the current one is left
            assert [f.path.name for f in list_log_files(tmp_path)] == [f"2025-01-06T0{hour}.jsonl"]
    finally:
        writer.close()


def test_a_query_reads_an_hour_compressed_after_it_listed_the_files(tmp_path: Path) -> None:
    """Compression that renames an hour between the listing and the read does not hide
    the hour from a query: its lines are read from the ``.gz``."""
    base = 1736121600.0
    writer = LogWriter(tmp_path, index=False, clock=lambda: base + 2 * 3600 + 400)
    writer.start()
    for i in range(20):
        body = m.Heartbeat(state="idle", pid=i)
        ts = base + i * 360  # ten an hour, two hours
        writer.append(
            m.Envelope(
                id=f"hb-{i}", topic="heartbeat.coder", sender="coder", ts=ts, seq=i, body=body
            )
        )
    writer.close()
    lines = query_lines(tmp_path, LogQuery(newest_first=True))
    first = [next(lines) for _ in range(10)]  # the newest hour; the files are listed now
    compress_closed(
        tmp_path, now=base + 2 * 3600 + 400, after_s=300, keep={hour_file_name(base + 3600)}
    )
    assert not (tmp_path / hour_file_name(base)).exists()
    rest = list(lines)
    assert len(first) + len(rest) == 20
