"""The task graph: its state machine, the lock between processes, crash safety, the CLI."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from orchestrator import task_graph as tg
from orchestrator.task_graph import (
    IllegalTransition,
    NodeState,
    TaskGraph,
    TaskGraphFile,
    TaskNode,
    UnknownTask,
)

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("graph_worker.py")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def graph(tmp_path: Path, clock: FakeClock) -> TaskGraph:
    return TaskGraph(tmp_path / "tasks.graph.json", clock=clock)


def worker(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_task_runs_through_its_states_with_times_and_attempts(
    graph: TaskGraph, clock: FakeClock
) -> None:
    node = graph.add("t1", kind="search", conversation="c1")
    assert (node.state, node.attempts, node.created) == ("queued", 0, 1000.0)
    clock.now = 1001.0
    node = graph.transition("t1", "assigned", agent="search")
    assert (node.state, node.agent, node.attempts) == ("assigned", "search", 1)
    clock.now = 1002.0
    node = graph.transition("t1", "running")
    assert node.started == 1002.0
    clock.now = 1005.5
    node = graph.transition("t1", "succeeded", result="3 pages")
    assert (node.state, node.result, node.finished) == ("succeeded", "3 pages", 1005.5)
    assert node.duration(now=9999.0) == 3.5
    assert graph.get("t1") == node
    assert graph.read().revision == 4


@pytest.mark.parametrize(
    ("path", "attempts"),
    [
        (["assigned", "running", "failed", "queued", "assigned"], 2),  # retry after failure
        (["assigned", "running", "queued", "assigned", "running"], 2),  # running agent lost
        (["assigned", "queued", "assigned"], 2),  # assigned agent lost
        (["assigned", "failed", "queued"], 1),  # the agent refused it
        (["cancelled"], 0),
        (["assigned", "running", "cancelled"], 1),
    ],
)
def test_legal_paths(graph: TaskGraph, path: list[NodeState], attempts: int) -> None:
    graph.add("t", kind="code")
    for state in path:
        node = graph.transition("t", state, agent="coder", error="why")
    assert node.state == path[-1] and node.attempts == attempts
    if path[-1] == "queued":
        assert node.agent is None and node.started is None and node.error == "why"


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], "running"),  # queued must be assigned first
        ([], "succeeded"),
        (["assigned", "running", "succeeded"], "queued"),  # succeeded is final
        (["cancelled"], "assigned"),  # cancelled is final
        (["assigned", "failed"], "running"),  # failed only goes back to queued
        (["assigned", "failed"], "cancelled"),
    ],
)
def test_an_illegal_transition_raises_and_writes_nothing(
    graph: TaskGraph, path: list[NodeState], illegal: NodeState
) -> None:
    graph.add("t", kind="code")
    for state in path:
        graph.transition("t", state)
    before = graph.path.read_bytes()
    with pytest.raises(IllegalTransition, match=f"cannot go from .* to {illegal}"):
        graph.transition("t", illegal)
    assert graph.path.read_bytes() == before


def test_a_move_to_the_current_state_changes_nothing(graph: TaskGraph) -> None:
    graph.add("t", kind="code")
    graph.transition("t", "assigned")
    before = graph.path.read_bytes()
    assert graph.transition("t", "assigned").attempts == 1  # a duplicate delivery
    assert graph.path.read_bytes() == before


def test_unknown_and_duplicate_tasks_are_errors(graph: TaskGraph) -> None:
    graph.add("a", kind="x")
    with pytest.raises(UnknownTask):
        graph.transition("nope", "assigned")
    with pytest.raises(UnknownTask):
        graph.add("b", kind="x", depends_on=["missing"])
    with pytest.raises(tg.DuplicateTask):
        graph.add("a", kind="x")
    with pytest.raises(IllegalTransition, match="not a task state"):
        graph.transition("a", "done")  # type: ignore[arg-type]
    assert set(graph.read().nodes) == {"a"}


def test_ready_lists_queued_tasks_whose_dependencies_succeeded(graph: TaskGraph) -> None:
    graph.add("a", kind="search")
    graph.add("b", kind="code", depends_on=["a"])
    graph.add("c", kind="rag")
    assert [n.id for n in graph.ready()] == ["a", "c"]
    for state in ("assigned", "running", "succeeded"):
        graph.transition("a", state)
    assert [n.id for n in graph.ready()] == ["b", "c"]


def test_a_corrupt_graph_is_moved_aside_loudly_and_a_fresh_one_starts(
    graph: TaskGraph, clock: FakeClock
) -> None:
    graph.path.write_bytes(b'{"version": 1, "nodes": {"a": {"id"')  # half a file
    with capture_logs() as logs:
        assert graph.read().nodes == {}
        graph.add("fresh", kind="x")
    aside = list(graph.path.parent.glob("tasks.graph.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b'{"version": 1')
    assert [e["log_level"] for e in logs if e["event"] == "task_graph_corrupt"] == ["error"]
    assert set(graph.read().nodes) == {"fresh"}


def test_readers_never_see_a_partial_file(graph: TaskGraph) -> None:
    def pad(g: TaskGraphFile) -> None:
        for i in range(1000):  # a file large enough to take time to write
            g.nodes[f"pad{i}"] = TaskNode(id=f"pad{i}", kind="pad", created=0.0, updated=0.0)

    graph.update(pad)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[Exception] = []

    def read_forever() -> None:
        while not stop.is_set():
            try:
                seen.append(
                    msgspec.json.decode(graph.path.read_bytes(), type=TaskGraphFile).revision
                )
            except Exception as exc:
                errors.append(exc)

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for i in range(30):
            graph.add(f"t{i}", kind="x")
    finally:
        stop.set()
        reader.join()
    assert not errors and seen == sorted(seen)


def test_finished_tasks_past_retention_move_to_the_archive_by_whole_subtrees(
    graph: TaskGraph, clock: FakeClock
) -> None:
    graph.add("root", kind="plan")
    graph.add("done", kind="search", parent="root")
    graph.add("child", kind="rag", parent="done")
    graph.add("lone", kind="code")
    for task in ("done", "child", "lone"):
        for state in ("assigned", "running", "succeeded"):
            graph.transition(task, state)
    graph.transition("root", "cancelled")
    clock.now += 100
    graph.add("keeps_parent", kind="x", parent="done")  # still queued, points at "done"
    clock.now += 1000
    # "done" stays while "keeps_parent" points at it, and so "root" stays for "done"
    assert graph.archive(older_than_s=500) == ["child", "lone"]
    assert set(graph.read().nodes) == {"root", "done", "keeps_parent"}
    assert [n.id for n in graph.archived()] == ["child", "lone"]
    graph.transition("keeps_parent", "cancelled")
    assert graph.archive(older_than_s=500) == []  # just finished: not old enough
    clock.now += 1000
    assert graph.archive(older_than_s=500) == ["root", "done", "keeps_parent"]
    assert graph.read().nodes == {}
    assert len(graph.archived()) == 5


def test_writes_archive_finished_tasks_past_retention_by_themselves(
    tmp_path: Path, clock: FakeClock
) -> None:
    graph = TaskGraph(tmp_path / "tasks.graph.json", retain_s=100, clock=clock)
    graph.add("old", kind="x")
    graph.transition("old", "cancelled")
    clock.now += 3700  # past retain_s, and an hour since the last archive pass
    graph.add("new", kind="x")
    assert set(graph.read().nodes) == {"new"}
    assert [n.id for n in graph.archived()] == ["old"]


def test_the_archive_drops_tasks_past_its_own_retention_and_keeps_unreadable_lines(
    tmp_path: Path, clock: FakeClock
) -> None:
    day = 86400.0
    path = tmp_path / "tasks.graph.json"
    graph = TaskGraph(path, retain_s=0, archive_retain_s=10 * day, clock=clock)

    def finish(task: str) -> None:
        graph.add(task, kind="x")
        graph.transition(task, "cancelled")
        graph.archive()

    finish("t0")  # updated at day 0
    clock.now += 5 * day
    finish("t1")  # day 5
    with graph.archive_path.open("ab") as f:
        f.write(b'{"torn mid-line\n')  # does not decode: kept as it is
    clock.now += 5.5 * day
    finish("t2")  # day 10.5: t0 is past retention, not yet past the daily slack
    lines = graph.archive_path.read_bytes().splitlines()
    assert len(lines) == 4
    clock.now += 1 * day
    finish("t3")  # day 11.5: t0 goes; t1 (6.5 days old) stays
    lines = graph.archive_path.read_bytes().splitlines()
    assert lines[1] == b'{"torn mid-line'
    ids = [msgspec.json.decode(line)["id"] for i, line in enumerate(lines) if i != 1]
    assert ids == ["t1", "t2", "t3"]
    # None keeps the archive for ever
    clock.now += 100 * day
    forever = TaskGraph(path, retain_s=0, archive_retain_s=None, clock=clock)
    forever.add("t4", kind="x")
    forever.transition("t4", "cancelled")
    forever.archive()
    assert len(graph.archive_path.read_bytes().splitlines()) == 5


def test_a_lock_held_by_a_killed_process_is_free_at_once(graph: TaskGraph) -> None:
    graph.add("a", kind="x")
    with worker("hold", str(graph.path)) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"locked\n"
            blocked = TaskGraph(graph.path, lock_timeout=0.2)
            with pytest.raises(tg.GraphLocked, match="not free within"):
                blocked.add("b", kind="x")
        finally:
            holder.send_signal(signal.SIGKILL)
    started = time.monotonic()
    TaskGraph(graph.path, lock_timeout=5).add("b", kind="x")
    assert time.monotonic() - started < 1
    assert set(graph.read().nodes) == {"a", "b"}


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: this test is about the lock, and 2000
    fsyncs on a real disk would take it from seconds to half a minute."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="chorus-test-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_eight_processes_times_250_updates_lose_nothing(fast_dir: Path) -> None:
    graph = TaskGraph(fast_dir / "tasks.graph.json")
    for i in range(8):
        graph.add(f"w{i}", kind="test")
    procs = [worker("cycle", str(graph.path), f"w{i}", "250") for i in range(8)]
    for proc in procs:
        _, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, err.decode()
    final = graph.read()
    assert final.revision == 8 + 8 * 250
    # 250 moves round assigned → running → failed → queued: 63 assignments, ending running
    assert {(n.state, n.attempts) for n in final.nodes.values()} == {("running", 63)}


def test_kill_9_mid_write_never_damages_the_graph(tmp_path: Path) -> None:
    graph = TaskGraph(tmp_path / "tasks.graph.json")

    def pad(g: TaskGraphFile) -> None:
        for i in range(3000):  # ~1.5 MB: a write takes long enough to be hit
            g.nodes[f"n{i}"] = TaskNode(
                id=f"n{i}", kind="pad", created=0.0, updated=0.0, result="r" * 300
            )

    graph.update(pad)
    landed_mid_write = 0
    for _ in range(60):
        with worker("churn", str(graph.path)) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            time.sleep(random.uniform(0.02, 0.15))
            proc.send_signal(signal.SIGKILL)
        temps = list(tmp_path.glob(".tasks.graph.json.*"))
        landed_mid_write += bool(temps)
        after = graph.read()  # decodes: whole
        assert len(after.nodes) == 3000
        if landed_mid_write:
            break
    assert landed_mid_write, "no kill landed inside a write in 60 tries"
    graph.add("after", kind="x")  # the next writer cleans the dead one's temp file
    assert list(tmp_path.glob(".tasks.graph.json.*")) == []


def _tasks_args(data_dir: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tg.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.data_dir = data_dir
    return args


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    graph = TaskGraph.at(tmp_path)
    graph.add("root", kind="plan", conversation="c1")
    graph.add("a", kind="search", conversation="c1", parent="root")
    graph.add("b", kind="code", conversation="c1", parent="root", depends_on=["a"])
    graph.add("other", kind="rag", conversation="c2")
    for state in ("assigned", "running", "succeeded"):
        graph.transition("a", state, agent="search", result="3 pages")
    graph.transition("b", "assigned", agent="coder")
    graph.transition("b", "failed", error="no compiler")
    return tmp_path


def test_tasks_cli_table_filters_and_json(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tg.run_tasks(_tasks_args(data_dir)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATE", "KIND"] and len(lines) == 5
    assert tg.run_tasks(_tasks_args(data_dir, "--state", "failed", "--json")) == 0
    nodes = [msgspec.json.decode(x, type=TaskNode) for x in capsys.readouterr().out.splitlines()]
    assert [(n.id, n.error) for n in nodes] == [("b", "no compiler")]
    assert tg.run_tasks(_tasks_args(data_dir, "--conversation", "c2", "--json")) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_tasks_cli_tree_shows_subtasks_under_their_parent(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tg.run_tasks(_tasks_args(data_dir, "--tree")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("root plan [queued]")
    assert lines[1].startswith("├── a search [succeeded] @search ran ")
    assert lines[2].startswith("└── b code [failed] @coder") and "no compiler" in lines[2]
    assert lines[3].startswith("other rag [queued]")


def test_tasks_cli_on_a_terminal_uses_rich(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert tg.run_tasks(_tasks_args(data_dir, "--tree")) == 0
    assert tg.run_tasks(_tasks_args(data_dir)) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out and "no compiler" in out


def test_format_duration() -> None:
    assert [tg.format_duration(s) for s in (0.25, 12.34, 242, 3900, 2 * 86400 + 3 * 3600)] == [
        "250ms",
        "12.3s",
        "4m02s",
        "1h05m",
        "2d03h",
    ]
