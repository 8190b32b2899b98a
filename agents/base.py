"""The task contract every worker agent is written against.

Subclass :class:`Agent`, set ``name`` to the agent's identity and implement
:meth:`Agent.on_task`: return a :class:`TaskResult` for success or raise
:class:`TaskFailed` (or any exception) for failure. Report progress with
:meth:`Agent.progress` and anything else worth recording with :meth:`Agent.emit`.

An agent has no way to publish on ``user.out``: the only outlets it gets are
``task.update`` and its own ``event.<name>``, and the broker would drop anything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from runtime import messages as m
from runtime.paths import DataDir


@dataclass(frozen=True)
class Task:
    """One task as the agent sees it."""

    id: str
    kind: str
    text: str
    conversation: str | None = None
    attempt: int = 1
    deadline_s: float = 120.0
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_envelope(cls, envelope: m.Envelope) -> Task:
        body = envelope.body
        assert isinstance(body, m.TaskAssign)
        return cls(
            id=body.task,
            kind=body.kind,
            text=body.text,
            conversation=envelope.conversation,
            attempt=body.attempt,
            deadline_s=body.deadline_s,
            params=dict(body.params),
        )


@dataclass(frozen=True)
class TaskResult:
    """What a finished task hands back: a short message, data, sources and artefacts."""

    message: str
    data: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    artefacts: list[str] = field(default_factory=list)


class TaskFailed(Exception):
    """Raise from :meth:`Agent.on_task` to fail the task with this reason."""


# how an agent reaches the bus: topic, body, task id, conversation
Publish = Callable[[str, m.Body, str | None, str | None], Awaitable[None]]


class Agent:
    """Base class of worker agents. The host (``agents.runtime``) calls the hooks."""

    name: str = ""  # the identity; the host sets it to the name it runs as
    # how many tasks this agent runs at once; the rest wait in its queue
    concurrency: ClassVar[int] = 1

    def __init__(self) -> None:
        self._publish: Publish | None = None
        self.settings: dict[str, str] = {}
        self.engine_endpoint: str | None = None  # the engine its instance names, if any
        self.key_dir: Path | None = None  # the keys it connected to the bus with

    def attach(
        self, publish: Publish, *, engine_endpoint: str | None = None, key_dir: Path | None = None
    ) -> None:
        """Called by the host before ``on_start``; gives the agent its outlets and where
        its instance's engine serves (``endpoints.json``), so a worker on another host
        reaches the same engine."""
        self._publish = publish
        self.engine_endpoint, self.key_dir = engine_endpoint, key_dir

    def engine_address(self, data_dir: str | Path) -> tuple[str, Path]:
        """Where this agent reaches the engine, and with which keys: what its instance
        names, else the engine socket and keys of ``data_dir``."""
        data = DataDir.at(data_dir)
        return self.engine_endpoint or data.ipc("engine"), self.key_dir or data.keys

    # -- hooks -------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Called once after connecting, before the first task."""

    async def on_task(self, task: Task) -> TaskResult:
        """Do the task. Return the result or raise :class:`TaskFailed`."""
        raise NotImplementedError

    async def on_cancel(self, task: Task) -> None:
        """Called after ``on_task`` was cancelled (by request, deadline or shutdown)."""

    async def on_stop(self) -> None:
        """Called once before the process exits."""

    async def on_config(self, key: str, value: str) -> None:
        """A run-time setting arrived on ``sys.config``; stored in ``self.settings``."""

    # -- outlets -----------------------------------------------------------------------

    async def progress(self, task: Task, message: str, fraction: float | None = None) -> None:
        """Tell the controller how the task is going (``task.update`` progress)."""
        await self._send(
            "task.update",
            m.TaskUpdate(task=task.id, state="progress", message=message, progress=fraction),
            task,
        )

    async def emit(
        self, name: str, data: dict[str, Any] | None = None, task: Task | None = None
    ) -> None:
        """Record something on this agent's ``event.<name>`` topic."""
        await self._send(f"event.{self.name}", m.Note(name=name, data=data or {}), task)

    async def fault(self, kind: m.FaultKind, message: str) -> None:
        """Report a fault of this process (``Fault`` on ``event.<name>``)."""
        await self._send(f"event.{self.name}", m.Fault(kind=kind, message=message), None)

    async def _send(self, topic: str, body: m.Body, task: Task | None) -> None:
        if self._publish is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a host yet")
        await self._publish(
            topic, body, task.id if task else None, task.conversation if task else None
        )
