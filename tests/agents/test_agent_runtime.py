"""A real agent process on a real broker: the task contract, heartbeats, cancel, stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import typing
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import pytest

from runtime import messages as m
from runtime.bus import Bus, Subscription
from runtime.paths import DataDir
from tests.conftest import BrokerProcess


@pytest.fixture
def echo_agent(data: DataDir, broker: BrokerProcess) -> Iterator[subprocess.Popen[bytes]]:
    with (data.root / "agent.stderr").open("ab") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime",
                "agent",
                "coder",
                "--connect",
                str(data.root),
                "--impl",
                "agents.testing:EchoAgent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@asynccontextmanager
async def controller(data: DataDir) -> AsyncIterator[tuple[Bus, Subscription]]:
    """The controller's side, once the agent has sent its first heartbeat. (A context
    manager, not a fixture: the bus's task group must close in the task that opened it.)"""
    async with Bus("controller", data.read_endpoints(), data.keys) as bus:
        updates = bus.subscribe("task.update")
        beats = bus.subscribe("heartbeat.coder")
        with anyio.fail_after(20):
            await beats.receive()  # the agent is up
        beats.close()
        yield bus, updates


async def states_of(
    updates: Subscription, task: str, until: set[str], timeout: float = 10
) -> list[m.TaskUpdate]:
    seen: list[m.TaskUpdate] = []
    with anyio.fail_after(timeout):
        async for env in updates:
            body = env.body
            if isinstance(body, m.TaskUpdate) and body.task == task:
                seen.append(body)
                if body.state in until:
                    return seen
    return seen


async def test_task_runs_to_a_result(data: DataDir, echo_agent: subprocess.Popen[bytes]) -> None:
    async with controller(data) as (bus, updates):
        await bus.publish(
            "task.assign.coder",
            m.TaskAssign(task="t1", kind="echo", text="hello", params={"sleep": "0.3"}),
            conversation="c1",
        )
        seen = await states_of(updates, "t1", {"result", "failed"})
        assert seen[0].state == "accepted"
        assert "progress" in [u.state for u in seen]
        assert seen[-1].state == "result" and seen[-1].message == "echo: hello"
        assert seen[-1].data == {"text": "hello"}


async def test_failure_is_reported_with_its_reason(
    data: DataDir, echo_agent: subprocess.Popen[bytes]
) -> None:
    async with controller(data) as (bus, updates):
        await bus.publish(
            "task.assign.coder",
            m.TaskAssign(task="t2", kind="echo", text="x", params={"fail": "no luck"}),
        )
        seen = await states_of(updates, "t2", {"result", "failed"})
        assert seen[-1].state == "failed" and seen[-1].message == "no luck"


async def test_cancel_stops_a_running_task(
    data: DataDir, echo_agent: subprocess.Popen[bytes]
) -> None:
    async with controller(data) as (bus, updates):
        await bus.publish(
            "task.assign.coder",
            m.TaskAssign(task="t3", kind="echo", text="x", params={"sleep": "30"}),
        )
        await states_of(updates, "t3", {"progress"})
        await bus.publish(
            "task.assign.coder", m.TaskCancel(task="t3", reason="user changed their mind")
        )
        seen = await states_of(updates, "t3", {"cancelled", "result", "failed"})
        assert seen[-1].state == "cancelled" and seen[-1].message == "user changed their mind"


async def test_deadline_fails_the_task(data: DataDir, echo_agent: subprocess.Popen[bytes]) -> None:
    async with controller(data) as (bus, updates):
        await bus.publish(
            "task.assign.coder",
            m.TaskAssign(task="t4", kind="echo", text="x", deadline_s=0.5, params={"sleep": "30"}),
        )
        seen = await states_of(updates, "t4", {"cancelled", "result", "failed"})
        assert seen[-1].state == "failed" and "deadline" in seen[-1].message


async def test_heartbeats_keep_coming_while_blocking_work_runs(
    data: DataDir, echo_agent: subprocess.Popen[bytes]
) -> None:
    async with controller(data) as (bus, updates):
        beats = bus.subscribe("heartbeat.coder")
        await anyio.sleep(0.3)
        await bus.publish(
            "task.assign.coder",
            m.TaskAssign(task="t5", kind="echo", text="x", params={"block": "3"}),
        )
        busy = []
        with anyio.fail_after(10):
            async for env in beats:
                assert isinstance(env.body, m.Heartbeat)
                if env.body.state == "busy":
                    busy.append(env.body)
                    assert env.body.task == "t5"
                if len(busy) >= 2:
                    break
        seen = await states_of(updates, "t5", {"result", "failed"})
        assert seen[-1].state == "result"


async def test_sigterm_fails_held_tasks_explicitly(
    data: DataDir, echo_agent: subprocess.Popen[bytes]
) -> None:
    async with controller(data) as (bus, updates):
        await bus.publish(
            "task.assign.coder",
            m.TaskAssign(task="long", kind="echo", text="x", params={"sleep": "60"}),
        )
        await bus.publish("task.assign.coder", m.TaskAssign(task="queued", kind="echo", text="x"))
        await states_of(updates, "long", {"progress"})
        echo_agent.send_signal(signal.SIGTERM)
        outcomes: dict[str, str] = {}
        with anyio.fail_after(15):
            async for env in updates:
                body = env.body
                if isinstance(body, m.TaskUpdate) and body.state in (
                    "failed",
                    "result",
                    "cancelled",
                ):
                    outcomes[body.task] = body.message
                    if len(outcomes) == 2:
                        break
        assert "stopping" in outcomes["long"] and "stopping" in outcomes["queued"]
        assert await anyio.to_thread.run_sync(echo_agent.wait, 10) == 0


async def test_every_kind_of_fault_an_agent_reports_reaches_the_bus(
    data: DataDir, echo_agent: subprocess.Popen[bytes]
) -> None:
    """Through the real broker, whose typed decoder drops what does not fit ``Fault``."""
    kinds = typing.get_args(m.FaultKind)
    async with controller(data) as (bus, updates):
        events = bus.subscribe("event.coder")
        params = {"faults": ",".join(kinds)}
        assign = m.TaskAssign(task="t1", kind="echo", text="x", params=params)
        await bus.publish("task.assign.coder", assign, conversation="c1")
        await states_of(updates, "t1", {"result", "failed"})
        got = []
        with anyio.fail_after(5):
            while len(got) < len(kinds):
                env = await events.receive()
                assert env.sender == "coder" and isinstance(env.body, m.Fault)
                got.append(env.body)
        assert got == [m.Fault(kind=k, message=f"a fault of kind {k}, as asked") for k in kinds]
