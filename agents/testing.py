"""Agents for testing your own setup: they exercise the task contract with no model."""

from __future__ import annotations

import os

import anyio

from .base import Agent, Task, TaskFailed, TaskResult


class EchoAgent(Agent):
    """Echoes the task text back. ``params``: ``sleep`` (seconds, in 0.1 s steps with
    progress), ``fail`` (fail with this reason), ``block`` (seconds of blocking work,
    sent to a thread as agents must), ``faults`` (first report a ``Fault`` of each of
    these kinds, comma-separated)."""

    name = "coder"

    async def on_task(self, task: Task) -> TaskResult:
        steps = int(float(task.params.get("sleep", "0")) * 10)
        for i in range(steps):
            await anyio.sleep(0.1)
            await self.progress(task, f"step {i + 1} of {steps}", (i + 1) / steps)
        if "block" in task.params:
            import time

            await anyio.to_thread.run_sync(time.sleep, float(task.params["block"]))
        for kind in filter(None, task.params.get("faults", "").split(",")):
            await self.fault(kind, f"a fault of kind {kind}, as asked")  # type: ignore[arg-type]
        if "fail" in task.params:
            raise TaskFailed(task.params["fail"])
        return TaskResult(message=f"echo: {task.text}", data={"text": task.text})


class EngineProbeAgent(Agent):
    """Asks the engine for a few tokens after the task's text and returns them: run it as
    ``python -m runtime agent coder --connect endpoints.json --impl
    agents.testing:EngineProbeAgent`` to check that a worker on another host reaches its
    instance's engine (the one ``endpoints.json`` names)."""

    name = "coder"

    async def on_task(self, task: Task) -> TaskResult:
        from engine.client import Client, EngineError, EngineUnavailable
        from engine.sampling import SamplingParams

        endpoint, keys = self.engine_address(os.environ.get("CHORUS_DATA_DIR", "data"))
        params = SamplingParams(temperature=0, max_tokens=8)
        try:
            async with Client(self.name, endpoint, keys, timeout=30) as llm:
                text = await llm.complete_text(task.text, params)
        except (EngineError, EngineUnavailable) as exc:
            raise TaskFailed(f"the engine at {endpoint} did not answer: {exc}") from exc
        return TaskResult(
            message=f"the engine at {endpoint} answered", data={"endpoint": endpoint, "text": text}
        )


class SlowAgent(Agent):
    """Works on every task for ``SECONDS`` (progress every second), then echoes it: a
    task that is reliably still running when a test kills the agent."""

    SECONDS = 20

    async def on_task(self, task: Task) -> TaskResult:
        for i in range(self.SECONDS):
            await anyio.sleep(1)
            await self.progress(task, f"second {i + 1} of {self.SECONDS}", (i + 1) / self.SECONDS)
        return TaskResult(message=f"slowly: {task.text}")
