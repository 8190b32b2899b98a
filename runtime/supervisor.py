"""The supervisor: starts every Chorus process, restarts the ones that die, stops all.

``python -m runtime launch`` and :class:`runtime.Runtime` both run this. Children are
started in order (broker first), each waited for until ready, and watched: a child
that exits or misses 5 heartbeats is restarted with exponential backoff (0.5 s doubling
to 30 s); after 5 restarts within 60 s the supervisor gives up on it (``sys.gave_up``).
The engine is not killed for silence (its ``engine.stats`` come every 2 s from a thread
of its own, and its sessions are costly to lose): when they stop for 5 s it is reported
as ``sys.silent``, once per silent spell; its exit is what restarts it.
Stopping sends SIGTERM to every child (the broker last), waits up to 10 s, then
SIGKILLs stragglers, and removes the sockets and the pid file. Each child's start (once
ready) and stop is announced as ``sys.started`` / ``sys.stopped``.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import anyio
import anyio.abc
import structlog

from . import lifeline, logconfig
from . import messages as m
from .bus import Bus
from .paths import DataDir

log = structlog.get_logger("supervisor")

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 30.0
GIVE_UP_RESTARTS = 5
GIVE_UP_WINDOW_S = 60.0
MISSED_HEARTBEATS = 5
HEARTBEAT_S = 1.0
STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 120.0

Readiness = Literal["endpoints", "heartbeat", "engine"]

# the worker agents and their implementations; replaced per Runtime for tests and apps
DEFAULT_AGENTS: dict[str, str] = {
    "coder": "agents.coder:CoderAgent",
    "search": "agents.search:SearchAgent",
    "rag": "agents.rag:RagAgent",
}


@dataclass
class ChildSpec:
    """How to start one child process and how to tell it is ready."""

    name: str
    argv: list[str]
    ready: Readiness
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Child:
    spec: ChildSpec
    process: anyio.abc.Process | None = None
    restarts: collections.deque[float] = field(default_factory=collections.deque)
    last_heartbeat: float = 0.0
    ready: anyio.Event = field(default_factory=anyio.Event)
    gave_up: bool = False
    kill_reason: str = ""
    silent_told: bool = False  # sys.silent was published for the current silent spell


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]


def engine_available() -> bool:
    """Whether the engine server exists in this build (it lands with the engine issue)."""
    return importlib.util.find_spec("engine.server") is not None


def default_specs(
    data: DataDir,
    *,
    agents: dict[str, str] | None = None,
    debug: bool = False,
    engine: bool = True,
    orchestration: bool = True,
    broker_args: tuple[str, ...] = (),
    engine_args: tuple[str, ...] = (),
    controller_args: tuple[str, ...] = (),
    narrator_args: tuple[str, ...] = (),
    shadow_args: tuple[str, ...] | None = None,
    candidate_engine_args: tuple[str, ...] | None = None,
    engine_endpoint: str | None = None,
) -> list[ChildSpec]:
    """The children of a full launch, in start order (``engine=False`` leaves it out;
    ``shadow_args`` adds the shadow narrator, ``narrator-shadow``, with those flags;
    ``candidate_engine_args`` a second engine, ``engine-candidate``, for a canary's
    candidate model; ``engine_endpoint`` is where the engine serves when not on its ipc
    socket, as its ``--bind``)."""
    common = ["--data-dir", str(data.root), "--log-json", *(["--debug"] if debug else [])]
    with_engine = engine and engine_available()
    if with_engine:
        served = engine_endpoint or data.ipc("engine")
        broker_args = (*broker_args, "--engine-endpoint", served)
    broker = python_argv("-m", "runtime", "broker", *common, *broker_args)
    specs = [ChildSpec("broker", broker, "endpoints")]
    if with_engine:
        engines = [("engine", engine_args)]
        if candidate_engine_args is not None:
            engines.append(("engine-candidate", candidate_engine_args))
        for name, args in engines:
            argv = python_argv("-m", "engine", "serve", "--name", name, *common, *args)
            specs.append(ChildSpec(name, argv, "engine"))
    elif engine:
        log.info("engine_skipped", reason="the engine server is not in this build")
    if orchestration:
        for role, extra in (("controller", controller_args), ("narrator", narrator_args)):
            argv = python_argv("-m", "orchestrator", role, *common, *extra)
            specs.append(ChildSpec(role, argv, "heartbeat"))
        if shadow_args is not None:
            argv = python_argv("-m", "orchestrator", "narrator", "--shadow", *common, *shadow_args)
            specs.append(ChildSpec("narrator-shadow", argv, "heartbeat"))
    for name, impl in (DEFAULT_AGENTS if agents is None else agents).items():
        argv = python_argv(
            "-m", "runtime", "agent", name, "--connect", str(data.root), "--impl", impl, *common[2:]
        )
        specs.append(ChildSpec(name, argv, "heartbeat"))
    return specs


class Supervisor:
    """Runs the children of one instance inside the caller's task group."""

    def __init__(
        self,
        data: DataDir,
        specs: list[ChildSpec],
        *,
        on_ready: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.data = data
        self.children = {spec.name: Child(spec) for spec in specs}
        self.on_ready = on_ready
        self.bus: Bus | None = None
        self.stopping = False
        self._stopped = anyio.Event()
        self._bus_ready = anyio.Event()
        self._stop_requested = anyio.Event()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start everything; report started once all are ready; run until :meth:`stop`."""
        self.data.endpoints_file.unlink(missing_ok=True)  # left by a killed broker
        try:
            async with anyio.create_task_group() as tg:
                for child in self.children.values():
                    started = time.monotonic()
                    tg.start_soon(self._keep_alive, child)
                    with anyio.fail_after(READY_TIMEOUT_S):
                        await child.ready.wait()
                    if child.spec.name == "broker":
                        await tg.start(self._bus_loop)
                        await self._announce("sys.started", child, "ready")  # no bus before
                    if self.on_ready is not None and child.process is not None:
                        self.on_ready(
                            child.spec.name, child.process.pid, time.monotonic() - started
                        )
                tg.start_soon(self._heartbeat_watch)
                task_status.started()
                await self._stop_requested.wait()
                await self._stop_children()
                tg.cancel_scope.cancel()
        finally:
            self._cleanup_files()
            self._stopped.set()

    async def stop(self) -> None:
        """Stop every child and wait until they are gone."""
        self.stopping = True
        self._stop_requested.set()
        await self._stopped.wait()

    # -- children ----------------------------------------------------------------------

    async def _keep_alive(self, child: Child) -> None:
        while not self.stopping and not child.gave_up:
            await self._start(child)
            assert child.process is not None
            tg_ready = anyio.create_task_group()
            async with tg_ready:
                tg_ready.start_soon(self._wait_ready, child, tg_ready.cancel_scope)
                tg_ready.start_soon(self._announce_ready, child)
                code = await child.process.wait()
                tg_ready.cancel_scope.cancel()
            if self.stopping:
                return
            reason = child.kill_reason or f"exited with code {code}"
            child.kill_reason = ""
            now = time.monotonic()
            child.restarts.append(now)
            while child.restarts and now - child.restarts[0] > GIVE_UP_WINDOW_S:
                child.restarts.popleft()
            if len(child.restarts) > GIVE_UP_RESTARTS:
                child.gave_up = True
                log.error("child_gave_up", process=child.spec.name, reason=reason)
                await self._announce("sys.gave_up", child, reason)
                return
            delay = min(BACKOFF_FIRST_S * 2 ** (len(child.restarts) - 1), BACKOFF_CAP_S)
            log.warning("child_restarting", process=child.spec.name, reason=reason, in_s=delay)
            await anyio.sleep(delay)
            child.ready = anyio.Event() if child.ready.is_set() else child.ready
            await self._announce("sys.restart", child, reason)

    async def _start(self, child: Child) -> None:
        self.data.process_logs.mkdir(parents=True, exist_ok=True)
        path = self.data.process_logs / f"{child.spec.name}.stderr"
        if path.exists() and path.stat().st_size > logconfig.MAX_BYTES:  # one generation kept
            os.replace(path, path.with_name(f"{path.name}.1"))
        stderr: IO[Any] = path.open("ab")
        try:
            child.process = await anyio.open_process(
                child.spec.argv,
                stdin=None,
                stdout=stderr,
                stderr=stderr,
                env={
                    **os.environ,
                    "CHORUS_DATA_DIR": str(self.data.root),
                    lifeline.ENV: str(os.getpid()),  # the child dies with us, even on SIGKILL
                    **child.spec.env,
                },
                start_new_session=True,  # Ctrl-C reaches the supervisor, which stops children in order
            )
        finally:
            stderr.close()
        child.last_heartbeat = time.monotonic()
        log.info("child_started", process=child.spec.name, pid=child.process.pid)

    async def _wait_ready(self, child: Child, scope: anyio.CancelScope) -> None:
        """Readiness of the broker; the others are ready at their first heartbeat or
        ``engine.stats`` (see ``_count_beats``)."""
        if child.spec.ready != "endpoints":
            return
        # the broker is another process: its file is the only signal there is
        while not self.data.endpoints_file.exists():  # noqa: ASYNC110
            await anyio.sleep(0.05)
        if self.bus is not None:  # a restarted broker: ready once the bus round-trips again
            await self._ping()
        child.ready.set()

    async def _announce_ready(self, child: Child) -> None:
        await child.ready.wait()
        await self._announce("sys.started", child, "ready")

    async def _ping(self) -> None:
        assert self.bus is not None
        with self.bus.subscribe("sys.ping") as pings:
            nonce = m.new_id()
            while True:
                await self.bus.publish("sys.ping", m.Ping(nonce=nonce))
                with anyio.move_on_after(0.2):
                    async for env in pings:
                        if isinstance(env.body, m.Ping) and env.body.nonce == nonce:
                            return

    async def _bus_loop(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with Bus("supervisor", self.data.read_endpoints(), self.data.keys) as bus:
            self.bus = bus
            await self._ping()
            with bus.subscribe("heartbeat.") as beats, bus.subscribe("engine.stats") as stats:
                task_status.started()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._count_beats, beats)
                    tg.start_soon(self._count_beats, stats)

    async def _count_beats(self, sub: Any) -> None:
        async for env in sub:
            body = env.body
            name = body.name if isinstance(body, m.EngineStats) else env.topic.split(".", 1)[1]
            child = self.children.get(name)
            if child is not None:
                child.last_heartbeat = time.monotonic()
                child.ready.set()

    async def _heartbeat_watch(self) -> None:
        last_tick = time.monotonic()
        while True:
            await anyio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            gap, last_tick = now - last_tick, now
            if gap > 2 * HEARTBEAT_S:
                # our own event loop was blocked (an app embedding the runtime doing sync
                # work): the children's heartbeats may be waiting unread, so silence
                # measured now would be ours, not theirs; count afresh from here
                log.info("supervisor_stalled", seconds=round(gap, 1))
                for child in self.children.values():
                    child.last_heartbeat = max(child.last_heartbeat, now)
                continue
            watched = [
                c
                for c in self.children.values()
                if c.spec.ready != "endpoints" and c.ready.is_set()
            ]
            freshest = max((c.last_heartbeat for c in watched), default=now)
            if len(watched) > 1 and now - freshest > 2 * HEARTBEAT_S:
                # nobody heard for a while: the common path (the broker, or a machine too
                # loaded to run it) is at fault, not each child, and killing healthy
                # children would only add to the load; the broker's exit restarts it
                log.warning("bus_silent", seconds=round(now - freshest, 1))
                continue
            for child in watched:
                silent = now - child.last_heartbeat
                if silent <= MISSED_HEARTBEATS * HEARTBEAT_S or child.process is None:
                    child.silent_told = False
                    continue
                if not child.silent_told:
                    child.silent_told = True
                    log.warning("child_silent", process=child.spec.name, silent_s=round(silent, 1))
                    await self._announce("sys.silent", child, f"silent for {silent:.1f} s")
                if child.spec.ready != "engine":
                    child.kill_reason = (
                        f"missed {MISSED_HEARTBEATS} heartbeats ({silent:.1f} s silent)"
                    )
                    _signal(child.process, signal.SIGKILL)
                    child.last_heartbeat = now

    async def _announce(self, topic: str, child: Child, reason: str) -> None:
        if self.bus is None:
            return
        pid = child.process.pid if child.process else 0
        body = m.ProcessEvent(
            process=child.spec.name, reason=reason, restarts=len(child.restarts), pid=pid
        )
        with anyio.move_on_after(1):  # a broker gone or stuck must not hold up a restart
            await self.bus.publish(topic, body)

    async def _stop_children(self) -> None:
        order = [c for c in self.children.values() if c.spec.name != "broker"]
        order += [c for c in self.children.values() if c.spec.name == "broker"]
        for group in (order[:-1], order[-1:]):  # everyone else, then the broker
            alive = [c for c in group if c.process is not None and c.process.returncode is None]
            for child in alive:
                if child.spec.name == "broker":  # said while there is still a bus to say it on
                    await self._announce("sys.stopped", child, "stopping")
                    if self.bus is not None:
                        # what we said went through the broker (so into its log) before it stops
                        with anyio.move_on_after(1):
                            await self._ping()
                assert child.process is not None
                _signal(child.process, signal.SIGTERM)
            with anyio.move_on_after(STOP_GRACE_S):
                for child in alive:
                    assert child.process is not None
                    await child.process.wait()
            for child in alive:
                assert child.process is not None
                if child.process.returncode is None:
                    log.warning("child_killed", pid=child.process.pid, after_s=STOP_GRACE_S)
                    _signal(child.process, signal.SIGKILL)
                    await child.process.wait()
                if child.spec.name != "broker":
                    code = child.process.returncode
                    await self._announce("sys.stopped", child, f"stopped (exit code {code})")

    def _cleanup_files(self) -> None:
        self.data.endpoints_file.unlink(missing_ok=True)
        sockets = self.data.socket_dir()
        for sock in sockets.glob("*.sock"):
            sock.unlink(missing_ok=True)
        if sockets != self.data.run:
            try:
                sockets.rmdir()
            except OSError:
                pass


def _signal(proc: anyio.abc.Process, signum: signal.Signals) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass
