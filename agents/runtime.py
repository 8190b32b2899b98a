"""Hosts one agent in its own process: tasks in, updates and heartbeats out.

The host connects to the bus with the agent's key, subscribes to
``task.assign.<name>`` and ``sys.config``, runs the agent's hooks inside one task
group, publishes ``heartbeat.<name>`` every second from a task of its own (an agent
must send blocking work to a thread, ``anyio.to_thread.run_sync``, so the event loop
and this heartbeat are never starved), cancels a task on request or at its deadline,
and on SIGTERM finishes or explicitly fails what it holds: nothing is silently lost.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import anyio
import psutil
import structlog
from anyio.abc import TaskGroup

from runtime import messages as m
from runtime.bus import Bus

from .base import Agent, Task, TaskResult

log = structlog.get_logger("agent")

HEARTBEAT_S = 1.0
STOP_GRACE_S = 5.0


@dataclass
class _Running:
    task: Task
    scope: anyio.CancelScope
    reason: str = ""  # why it was cancelled, once it was
    outcome: m.TaskState = "failed"  # what a cancellation reports: failed unless requested


@dataclass
class HostState:
    """What the heartbeat reports."""

    state: str = "starting"
    queue: list[Task] = field(default_factory=list)
    running: dict[str, _Running] = field(default_factory=dict)


class AgentHost:
    """Runs ``agent`` on ``bus`` until stopped (SIGTERM/SIGINT or :meth:`stop`)."""

    def __init__(self, agent: Agent, bus: Bus) -> None:
        self.agent = agent
        self.bus = bus
        self.name = agent.name
        self.status = HostState()
        self._queue_send, self._queue_recv = anyio.create_memory_object_stream[Task](1000)
        self._stopping = anyio.Event()
        self._task_done = anyio.Event()
        self._proc = psutil.Process()

    async def run(self) -> None:
        """Serve until asked to stop, then shut down cleanly."""
        self.agent.attach(
            self._publish, engine_endpoint=self.bus.endpoints.engine, key_dir=self.bus.key_dir
        )
        await self.agent.on_start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._signal_loop)
            tg.start_soon(self._config_loop)
            workers = anyio.create_task_group()
            async with workers:
                for _ in range(max(1, self.agent.concurrency)):
                    workers.start_soon(self._work_loop)
                await self._assignment_loop(workers)
            await self._drain_queue("the agent is stopping; the task was not started")
            self.status.state = "stopping"
            await self._heartbeat()
            await self.agent.on_stop()
            tg.cancel_scope.cancel()

    def stop(self) -> None:
        """Stop taking tasks; the current ones get a grace period to finish."""
        self._stopping.set()

    async def _publish(
        self, topic: str, body: m.Body, task: str | None, conversation: str | None
    ) -> None:
        await self.bus.publish(topic, body, task=task, conversation=conversation)

    async def _update(
        self, task: Task, state: m.TaskState, message: str = "", result: TaskResult | None = None
    ) -> None:
        body = m.TaskUpdate(
            task=task.id,
            state=state,
            message=message,
            data=result.data if result else {},
            sources=result.sources if result else [],
            artefacts=result.artefacts if result else [],
        )
        await self._publish("task.update", body, task.id, task.conversation)

    # -- loops -------------------------------------------------------------------------

    async def _assignment_loop(self, workers: TaskGroup) -> None:
        with self.bus.subscribe(f"task.assign.{self.name}") as assignments:
            async with anyio.create_task_group() as tg:

                async def watch_stop() -> None:
                    await self._stopping.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_stop)
                async for envelope in assignments:
                    await self._on_assignment(envelope)
        # stopping: no new tasks; the running ones get a grace period
        self._queue_send.close()
        with anyio.move_on_after(STOP_GRACE_S):
            while self.status.running:
                await self._task_done.wait()
                self._task_done = anyio.Event()
        for running in self.status.running.values():
            running.reason = "the agent is stopping"
            running.scope.cancel()

    async def _on_assignment(self, envelope: m.Envelope) -> None:
        body = envelope.body
        if isinstance(body, m.TaskAssign):
            task = Task.from_envelope(envelope)
            await self._update(task, "accepted")
            self.status.queue.append(task)
            await self._queue_send.send(task)
        elif isinstance(body, m.TaskCancel):
            running = self.status.running.get(body.task)
            if running is not None:
                running.reason = body.reason or "cancelled on request"
                running.outcome = "cancelled"
                running.scope.cancel()
            for queued in list(self.status.queue):
                if queued.id == body.task:
                    self.status.queue.remove(queued)
                    await self._update(queued, "cancelled", body.reason or "cancelled on request")

    async def _work_loop(self) -> None:
        async for task in self._queue_recv:
            if task not in self.status.queue or self._stopping.is_set():
                continue  # cancelled while it waited, or left for _drain_queue
            self.status.queue.remove(task)
            await self._run_task(task)

    async def _run_task(self, task: Task) -> None:
        scope = anyio.CancelScope(deadline=anyio.current_time() + task.deadline_s)
        running = _Running(task, scope)
        self.status.running[task.id] = running
        result: TaskResult | None = None
        error = ""
        try:
            with scope:
                result = await self.agent.on_task(task)
        except Exception as exc:  # an agent's failure is a task's failure, not the host's
            error = str(exc) or type(exc).__name__
            log.warning("task_failed", task=task.id, error=error)
        finally:
            del self.status.running[task.id]
            self._task_done.set()
        with anyio.CancelScope(shield=True):
            if scope.cancelled_caught or (result is None and not error):
                reason = running.reason or f"deadline of {task.deadline_s:g} s exceeded"
                await self.agent.on_cancel(task)
                await self._update(task, running.outcome, reason)
            elif error:
                await self._update(task, "failed", error)
            else:
                assert result is not None
                await self._update(task, "result", result.message, result)

    async def _drain_queue(self, reason: str) -> None:
        for task in self.status.queue:
            await self._update(task, "failed", reason)
        self.status.queue.clear()

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._heartbeat()
            await anyio.sleep(HEARTBEAT_S)

    async def _heartbeat(self) -> None:
        if self.status.state != "stopping":
            self.status.state = "busy" if self.status.running else "idle"
        current = next(iter(self.status.running), None)
        body = m.Heartbeat(
            state=self.status.state,  # type: ignore[arg-type]
            task=current,
            queue_depth=len(self.status.queue),
            load=self._proc.cpu_percent() / 100.0,
            pid=os.getpid(),
        )
        await self._publish(f"heartbeat.{self.name}", body, current, None)

    async def _config_loop(self) -> None:
        with self.bus.subscribe("sys.config") as configs:
            async for envelope in configs:
                if isinstance(envelope.body, m.ConfigChange):
                    self.agent.settings[envelope.body.key] = envelope.body.value
                    await self.agent.on_config(envelope.body.key, envelope.body.value)

    async def _signal_loop(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("agent_stopping", signal=signal.Signals(signum).name)
                self.stop()
