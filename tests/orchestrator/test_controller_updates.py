"""Only the agent that holds a task may move it: the ACL lets every worker publish on
``task.update``, so the controller checks the sender. A real broker and buses."""

from __future__ import annotations

import anyio

from orchestrator.controller import Controller
from runtime import messages as m
from runtime.bus import Bus
from runtime.paths import DataDir
from tests.conftest import BrokerProcess
from tests.orchestrator.test_controller_memory import beat


async def test_an_update_from_an_agent_that_does_not_hold_the_task_is_refused(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    async with (
        Bus("client", ep, data.keys) as user,
        Bus("coder", ep, data.keys) as coder,
        Bus("search", ep, data.keys) as impostor,
        Bus("controller", ep, data.keys) as bus,
        Bus("narrator", ep, data.keys) as narrator,
        Bus("monitor", ep, data.keys) as monitor,
        anyio.create_task_group() as tg,
    ):
        controller = Controller(bus, data, engine=None)
        with (
            narrator.subscribe("narrator.cue") as cues,
            coder.subscribe("task.assign.coder") as assigned,
            monitor.subscribe("event.controller") as faults,
        ):
            tg.start_soon(controller.run)
            tg.start_soon(beat, coder)
            with anyio.fail_after(10):
                while "coder" not in controller.last_seen:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            text = "Compute 6 * 7 in Python and print it."
            await user.publish("user.in", m.UserTurn(text=text), conversation="c1")
            with anyio.fail_after(10):
                env = await assigned.receive()
            assert isinstance(env.body, m.TaskAssign)
            task = env.body.task
            forged = m.TaskUpdate(task=task, state="result", message="999")
            await impostor.publish("task.update", forged, conversation="c1", task=task)
            with anyio.fail_after(10):
                fault = (await faults.receive()).body
            assert isinstance(fault, m.Fault) and "search sent an update" in fault.message
            assert not controller.tasks[task].done  # the forged result moved nothing
            for state in ("accepted", "result"):
                update = m.TaskUpdate(task=task, state=state, message="42")
                await coder.publish("task.update", update, conversation="c1", task=task)
            with anyio.fail_after(10):
                async for env in cues:
                    if isinstance(env.body, m.Cue) and env.body.kind == "result":
                        result = env.body
                        break
            said = " ".join([*result.cover, *result.attachments])
            assert "42" in said and "999" not in said, result
        tg.cancel_scope.cancel()
