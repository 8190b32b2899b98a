"""The supervisor with real processes: readiness, restarts, giving up, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import msgspec
import psutil
import pytest

import runtime.supervisor as supervisor_module
from orchestrator.log.query import LogQuery, query_lines
from runtime import messages as m
from runtime.embed import Runtime
from runtime.errors import AlreadyRunning
from runtime.paths import DataDir
from tests.conftest import pid_alive

ECHO = {"coder": "agents.testing:EchoAgent"}


async def next_heartbeat(rt: Runtime, name: str, other_than: int = 0) -> m.Heartbeat:
    with anyio.fail_after(30), rt.subscribe(f"heartbeat.{name}") as beats:
        async for env in beats:
            assert isinstance(env.body, m.Heartbeat)
            if env.body.pid != other_than:
                return env.body
    raise AssertionError("unreachable")


def child_pid(rt: Runtime, name: str) -> int:
    assert rt.supervisor is not None
    proc = rt.supervisor.children[name].process
    assert proc is not None
    return proc.pid


def assert_nothing_left(data: DataDir, pids: list[int]) -> None:
    assert not any(pid_alive(pid) for pid in pids), "a child outlived the supervisor"
    assert not data.endpoints_file.exists()
    assert not (data.run / "launch.pid").exists()
    assert not list(data.socket_dir().glob("*.sock"))


async def test_runtime_starts_restarts_a_killed_child_and_stops_clean(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents=ECHO, engine=False, orchestration=False) as rt:
        first = await next_heartbeat(rt, "coder")
        pids = [child_pid(rt, "broker"), first.pid]
        with anyio.fail_after(30):
            restarts = rt.subscribe("sys.restart")
            os.kill(first.pid, signal.SIGKILL)
            again = await next_heartbeat(rt, "coder", other_than=first.pid)
            event = await anext(restarts)
        assert again.pid != first.pid
        assert isinstance(event.body, m.ProcessEvent) and event.body.process == "coder"
        assert "exited" in event.body.reason
        pids.append(again.pid)
    assert_nothing_left(data, pids)
    # the bus log has every start and stop the supervisor announced, in order
    said = [
        (e.topic, e.body.process, e.body.pid)
        for line in query_lines(data.logs, LogQuery(topics=("sys.started", "sys.stopped")))
        if isinstance((e := msgspec.json.decode(line, type=m.Envelope)).body, m.ProcessEvent)
    ]
    assert said == [
        ("sys.started", "broker", pids[0]),
        ("sys.started", "coder", first.pid),
        ("sys.started", "coder", again.pid),
        ("sys.stopped", "coder", again.pid),
        ("sys.stopped", "broker", pids[0]),
    ]


async def test_broker_restart_mid_task_the_task_still_completes(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents=ECHO, engine=False, orchestration=False) as rt:
        await next_heartbeat(rt, "coder")
        async with rt.bus("controller") as controller:
            updates = controller.subscribe("task.update")
            await anyio.sleep(0.3)
            os.kill(child_pid(rt, "broker"), signal.SIGKILL)
            sent = await controller.publish(
                "task.assign.coder",
                m.TaskAssign(task="survives", kind="echo", text="hi", params={"sleep": "0.5"}),
            )
            with anyio.fail_after(30):
                await controller.delivered(sent.id)
                async for env in updates:
                    if isinstance(env.body, m.TaskUpdate) and env.body.state == "result":
                        assert env.body.task == "survives"
                        break
        await next_heartbeat(rt, "coder")  # the agent and our monitor reconnected too


async def test_silent_child_is_killed_and_restarted(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents=ECHO, engine=False, orchestration=False) as rt:
        first = await next_heartbeat(rt, "coder")
        with rt.subscribe("sys.silent") as silent:
            os.kill(first.pid, signal.SIGSTOP)
            try:
                again = await next_heartbeat(rt, "coder", other_than=first.pid)
            finally:
                if pid_alive(first.pid):
                    os.kill(first.pid, signal.SIGKILL)
            assert again.pid != first.pid
            with anyio.fail_after(5):
                said = await anext(silent)
        assert isinstance(said.body, m.ProcessEvent) and said.body.process == "coder"
        assert said.body.pid == first.pid and "silent for" in said.body.reason


async def test_supervisor_gives_up_on_a_child_that_keeps_dying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "BACKOFF_FIRST_S", 0.01)
    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents=ECHO, engine=False, orchestration=False) as rt:
        await next_heartbeat(rt, "coder")
        assert rt.supervisor is not None
        child = rt.supervisor.children["coder"]
        child.spec.argv = [sys.executable, "-c", "raise SystemExit(3)"]
        gave_up = rt.subscribe("sys.gave_up")
        os.kill(child_pid(rt, "coder"), signal.SIGKILL)
        with anyio.fail_after(30):
            env = await anext(gave_up)
        assert isinstance(env.body, m.ProcessEvent) and env.body.process == "coder"
        assert child.gave_up


async def test_second_instance_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents={}, engine=False, orchestration=False):
        with pytest.raises(AlreadyRunning, match="already runs"):
            async with Runtime(data.root, agents={}, engine=False, orchestration=False):
                pass


def launch_until_up(data: DataDir) -> tuple[subprocess.Popen[str], list[str]]:
    """``python -m runtime launch --no-engine`` and what it printed until it was up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "launch", "--data-dir", str(data.root), "--no-engine"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        lines.append(line)
        if "Chorus is up" in line or time.monotonic() > deadline:
            break
    return proc, lines


def test_launch_cli_starts_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    proc, lines = launch_until_up(data)
    assert any("ready  broker" in line for line in lines), lines
    broker_pid = int(
        next(line for line in lines if "ready  broker" in line).split("pid")[1].split()[0]
    )
    second = subprocess.run(
        [sys.executable, "-m", "runtime", "launch", "--data-dir", str(data.root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2 and "already runs" in second.stderr
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "stopped." in out
    assert_nothing_left(data, [broker_pid])


@pytest.mark.slow
async def test_launch_with_the_engine_restarts_it_after_a_kill(tmp_path: Path) -> None:
    """The real default model: the engine is ready when it reports on the bus; a frozen
    engine is reported (``sys.silent``) but not killed; a killed engine comes back and
    serves again."""
    from engine.client import Client
    from engine.sampling import SamplingParams

    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents={}) as rt:
        assert data.read_endpoints().engine == data.ipc("engine")
        with rt.subscribe("engine.stats") as stats, anyio.fail_after(120):
            first = await anext(stats)
            assert isinstance(first.body, m.EngineStats) and first.body.device == "cpu"
            old = child_pid(rt, "engine")
            with rt.subscribe("sys.silent") as silent:
                os.kill(old, signal.SIGSTOP)
                try:
                    said = await anext(silent)
                finally:
                    os.kill(old, signal.SIGCONT)
                    resumed = time.time()
            assert isinstance(said.body, m.ProcessEvent) and said.body.process == "engine"
            async for env in stats:  # it reports again, the same process
                if env.ts > resumed + 3:
                    break
            assert child_pid(rt, "engine") == old
            os.kill(old, signal.SIGKILL)
            async for _ in stats:
                if child_pid(rt, "engine") != old:
                    break
        async with Client.connect("controller", data.root, timeout=120) as llm:
            text = await llm.complete_text("1, 2, 3,", SamplingParams(temperature=0, max_tokens=4))
        assert text.strip()


def test_children_end_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    proc, _ = launch_until_up(data)
    assert proc.stdout is not None
    children = psutil.Process(proc.pid).children()
    assert {c.name() for c in children} and len(children) >= 6, children  # broker … rag
    proc.kill()  # SIGKILL: no chance to stop anything in order
    proc.wait()
    proc.stdout.close()
    _, alive = psutil.wait_procs(children, timeout=30)
    # a child that exited but is not reaped yet (no init to reap it here) counts as gone
    alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(c.pid, c.cmdline()) for c in alive]


async def test_a_blocked_host_loop_is_not_taken_for_silent_children(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents=ECHO, engine=False, orchestration=False) as rt:
        first = await next_heartbeat(rt, "coder")
        restarts = rt.subscribe("sys.restart")
        # an app embedding the runtime does slow synchronous work on the event loop; the
        # coder keeps beating meanwhile, but nobody reads its heartbeats
        time.sleep(3 * supervisor_module.MISSED_HEARTBEATS * supervisor_module.HEARTBEAT_S)  # noqa: ASYNC251
        await anyio.sleep(3 * supervisor_module.HEARTBEAT_S)
        assert child_pid(rt, "coder") == first.pid
        with anyio.move_on_after(0.5):
            async for env in restarts:
                raise AssertionError(f"restarted after the host's stall: {env.body}")


async def test_a_stalled_broker_does_not_get_healthy_children_killed(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    agents = {**ECHO, "search": "agents.testing:EchoAgent"}
    async with Runtime(data.root, agents=agents, engine=False, orchestration=False) as rt:
        await next_heartbeat(rt, "coder")
        await next_heartbeat(rt, "search")
        before = {name: child_pid(rt, name) for name in ("broker", "coder", "search")}
        os.kill(before["broker"], signal.SIGSTOP)  # every heartbeat stops arriving at once
        try:
            await anyio.sleep(
                2 * supervisor_module.MISSED_HEARTBEATS * supervisor_module.HEARTBEAT_S
            )
        finally:
            os.kill(before["broker"], signal.SIGCONT)
        await next_heartbeat(rt, "coder")
        assert {name: child_pid(rt, name) for name in before} == before
