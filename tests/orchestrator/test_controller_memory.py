"""A controller serving turn after turn keeps no record of finished work: tasks are let go
once done, and conversations past their notices are forgotten. A real broker and buses;
the coder is a bare ``coder`` bus that answers every assignment at once."""

from __future__ import annotations

import os
import time

import anyio

from orchestrator.controller import NOTICE_ACTIVE_S, Controller
from runtime import messages as m
from runtime.bus import Bus
from runtime.paths import DataDir
from tests.conftest import BrokerProcess


async def beat(coder: Bus) -> None:
    """The coder's heartbeats, every 0.5 s, until cancelled."""
    while True:
        await coder.publish("heartbeat.coder", m.Heartbeat(state="idle", pid=os.getpid()))
        await anyio.sleep(0.5)


async def answering_coder(bus: Bus) -> None:
    """Heartbeats, and a result for every assignment."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(beat, bus)
        with bus.subscribe("task.assign.coder") as assigned:
            async for env in assigned:
                if isinstance(env.body, m.TaskAssign):
                    for state in ("accepted", "result"):
                        update = m.TaskUpdate(task=env.body.task, state=state, message="42")
                        await bus.publish(
                            "task.update", update, conversation=env.conversation, task=env.task
                        )


async def test_finished_tasks_and_quiet_conversations_are_let_go(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    async with (
        Bus("client", ep, data.keys) as user,
        Bus("coder", ep, data.keys) as coder,
        Bus("controller", ep, data.keys) as bus,
        Bus("narrator", ep, data.keys) as narrator,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(answering_coder, coder)
        controller = Controller(bus, data, engine=None)
        with narrator.subscribe("narrator.cue") as cues:
            tg.start_soon(controller.run)
            with anyio.fail_after(10):
                while "coder" not in controller.last_seen:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            for i in range(5):
                text = f"Compute {i} * 7 in Python and print it."
                await user.publish("user.in", m.UserTurn(text=text), conversation=f"c{i}")
            results = 0
            with anyio.fail_after(20):
                async for env in cues:
                    if isinstance(env.body, m.Cue) and env.body.kind == "result":
                        results += 1
                        if results == 5:
                            break
        assert controller.tasks == {}  # every task was let go once its result came
        assert set(controller.active) == {f"c{i}" for i in range(5)}
        controller._forget(time.monotonic() + NOTICE_ACTIVE_S + 1)
        assert controller.active == {}
        tg.cancel_scope.cancel()
