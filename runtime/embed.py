"""The embedding API: start Chorus from inside an app, or attach to a running one.

    async with runtime.Runtime(data_dir="data") as rt:
        async for envelope in rt.subscribe("task."):
            ...

``Runtime`` runs the same supervisor as ``python -m runtime launch`` (the processes stay
separate) and stops everything on exit; ``connect(data_dir)`` attaches to an instance
that is already running and stops nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncGenerator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
import anyio.abc

from . import messages as m
from .bus import Bus, Subscription
from .errors import MessageRejected, NotRunning
from .instance import InstanceLock
from .keys import ensure_keys
from .ordering import InOrder
from .paths import DataDir
from .settings import Settings
from .supervisor import Supervisor, default_specs


class Connection:
    """A live connection to a running instance: ``publish`` as ``client``, ``subscribe``
    as ``monitor`` (which reads everything), ``bus(identity)`` for anything else."""

    def __init__(self, data: DataDir) -> None:
        self.data = data
        self._stack = AsyncExitStack()
        self._client: Bus | None = None
        self._monitor: Bus | None = None

    async def _open(self) -> None:
        try:
            endpoints = self.data.read_endpoints()
        except FileNotFoundError:
            raise NotRunning(
                f"no Chorus runs against {self.data.root} (no {self.data.endpoints_file}); "
                "start one with `python -m runtime launch`"
            ) from None
        self._client = await self._stack.enter_async_context(
            Bus("client", endpoints, self.data.keys)
        )
        self._monitor = await self._stack.enter_async_context(
            Bus("monitor", endpoints, self.data.keys)
        )

    async def aclose(self) -> None:
        await self._stack.aclose()

    async def publish(
        self, topic: str, body: m.Body, *, conversation: str | None = None
    ) -> m.Envelope:
        """Publish as the ``client`` identity (the broker's ACL applies)."""
        assert self._client is not None
        return await self._client.publish(topic, body, conversation=conversation)

    def subscribe(self, prefix: str = "") -> Subscription:
        """Every envelope whose topic starts with ``prefix``, read as ``monitor``.
        Registered at once; iterate with ``async for`` and close it (``with``) when done."""
        assert self._monitor is not None
        return self._monitor.subscribe(prefix)

    def bus(self, identity: str) -> Bus:
        """A bus of your own as ``identity`` (use ``async with``); needs that key."""
        return Bus(identity, self.data.read_endpoints(), self.data.keys)

    async def chat(
        self, text: str, *, conversation: str | None = None
    ) -> AsyncGenerator[m.Chunk, None]:
        """Send a user turn and yield the narrator's chunks about it (an acknowledgement,
        progress, the answer) until the one that closes the turn: each stream's in ``seq``
        order and each once (:class:`~runtime.ordering.InOrder`: after a broker restart the
        narrator says its last chunks again). A turn the broker would refuse (over its size
        limit) is never sent: the one chunk is then the ``input_rejected`` playbook line,
        made here, as a final notice."""
        assert self._client is not None
        conversation = conversation or m.new_id()
        with self._client.subscribe("user.out") as out:
            try:
                turn = await self.publish(
                    "user.in", m.UserTurn(text=text), conversation=conversation
                )
            except MessageRejected as exc:
                from orchestrator.prompts import playbook

                line = playbook("input_rejected", str(exc))
                yield m.Chunk(
                    stream=f"local-{m.new_id()}",
                    seq=0,
                    delta=line,
                    final=True,
                    finish="error",
                    notice=True,
                    closes_turn=True,
                )
                return
            order = InOrder()
            while True:
                ready: list[m.Chunk] = []
                gap = order.wait_s(anyio.current_time())
                with anyio.move_on_after(math.inf if gap is None else gap):
                    try:
                        envelope = await out.receive()
                    except anyio.EndOfStream:
                        return
                    body = envelope.body
                    if isinstance(body, m.Chunk) and body.turn == turn.id:
                        ready = order.offer(body, anyio.current_time())
                ready += order.expire(anyio.current_time())
                for chunk in ready:
                    yield chunk
                    if chunk.final and chunk.closes_turn:
                        return


class Runtime(Connection):
    """Starts a whole Chorus instance in the current event loop; stops it on exit.

    ``settings`` set the broker, the engine and the controller as they do for ``launch``
    (the model, device, cache, addresses, limits, log retention, gating timers); by
    default they are read as ``launch`` reads them: ``CHORUS_*`` variables, then the env
    file, then the defaults. ``engine=False`` (or ``CHORUS_ENGINE=false``) starts no
    engine. ``narrator_args`` are flags for the narrator (``python -m orchestrator narrator
    --help``: its prompt, sampling, a canary candidate); ``shadow_args``, when given, start
    the shadow narrator with those flags (docs/rollout.md)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        agents: dict[str, str] | None = None,
        engine: bool = True,
        orchestration: bool = True,
        debug: bool = False,
        narrator_args: Sequence[str] = (),
        shadow_args: Sequence[str] | None = None,
        settings: Settings | None = None,
    ) -> None:
        super().__init__(DataDir.at(data_dir))
        self.settings = settings if settings is not None else Settings.load()[0]
        self._narrator_args = tuple(narrator_args)
        self._shadow_args = None if shadow_args is None else tuple(shadow_args)
        self._agents = agents
        self._engine = engine
        self._orchestration = orchestration
        self._debug = debug
        self.supervisor: Supervisor | None = None

    async def __aenter__(self) -> Self:
        self.data.ensure()
        ensure_keys(self.data.keys)
        self._stack.enter_context(InstanceLock(self.data))
        from .cli import child_flags

        broker_args, engine_args, controller_args = child_flags(self.settings)
        self.supervisor = Supervisor(
            self.data,
            default_specs(
                self.data,
                agents=self._agents,
                engine=self._engine and self.settings.engine,
                orchestration=self._orchestration,
                debug=self._debug,
                broker_args=broker_args,
                engine_args=engine_args,
                controller_args=controller_args,
                narrator_args=self._narrator_args,
                shadow_args=self._shadow_args,
                engine_endpoint=self.settings.engine_bind,
            ),
        )
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.push_async_callback(self.supervisor.stop)
        try:
            await tg.start(self.supervisor.run)
            await self._open()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Attached(Connection):
    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def connect(data_dir: str | os.PathLike[str] | Path | None = None) -> _Attached:
    """Attach to a running instance: ``async with runtime.connect("data") as rt:``."""
    return _Attached(DataDir.at(data_dir))
