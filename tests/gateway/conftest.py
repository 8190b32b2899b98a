"""Fixtures for the gateway tests: a real instance (echo agents, the real controller and
narrator, no engine) and real ``python -m runtime serve`` processes in front of it."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from runtime import messages as m
from runtime.bus import Bus, Subscription
from runtime.gateway.feeds import read_sse
from runtime.keys import ensure_keys
from runtime.paths import DataDir

HERE = Path(__file__).parent


class _Lines:
    """A child's stdout lines, read by a thread (a pipe read with a timeout)."""

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        self.proc, self.what = proc, what
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self._lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.what} exited with {self.proc.returncode}") from None
        raise TimeoutError(f"{self.what} printed nothing in {timeout:g} s")


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


class Instance:
    """``tests/gateway/instance.py`` in a child process."""

    def __init__(self, data: DataDir) -> None:
        self.data = data
        with (data.root / "instance.stderr").open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "instance.py"), str(data.root)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        lines = _Lines(self.proc, "the instance")
        try:
            while "ready" not in lines.next(90):
                pass
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int:
        return _stop(self.proc)


@dataclass
class Gateway:
    """A ``python -m runtime serve`` process; ``url`` and ``token`` to reach it."""

    proc: subprocess.Popen[str]
    url: str
    token: str

    @classmethod
    def start(
        cls, data: DataDir, *args: str, command: str = "serve", timeout: float = 30
    ) -> Gateway:
        """``python -m runtime serve`` (or ``launch --serve`` with ``command="launch"``)."""
        argv = ["-m", "runtime", command, "--data-dir", str(data.root), "--port", "0", *args]
        if command == "launch":
            argv.append("--serve")
        data.root.mkdir(parents=True, exist_ok=True)
        with (data.root.parent / f"{command}.stderr").open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        lines = _Lines(proc, command)
        try:
            first = lines.next(timeout)
            while command == "launch" and not first.startswith("Gateway on "):
                first = lines.next(timeout)  # launch's own lines come first
            assert first.startswith("Gateway on http://"), first
            url = first.split()[2]
            login = lines.next(5)
            token = (data.keys / "gateway.token").read_text().strip()
            assert f"{url}/login?token={token}" in login
        except BaseException:
            _stop(proc)
            raise
        return cls(proc, url, token)

    def client(self, *, auth: bool = True, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kwargs)

    async def wait_connected(self, agents: tuple[str, ...] = ()) -> None:
        """Until /healthz sees the bus and /v1/agents lists ``agents`` as alive."""
        import anyio

        async with self.client() as client:
            with anyio.fail_after(60):
                while True:
                    health = (await client.get("/healthz")).json()
                    listed = (await client.get("/v1/agents")).json()["agents"]
                    alive = {a["name"] for a in listed if a["state"] in ("idle", "busy")}
                    if health["bus"] and alive >= set(agents):
                        return
                    await anyio.sleep(0.2)

    def stop(self) -> int:
        return _stop(self.proc)


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    """One instance for the module: echo agents, controller, narrator, no engine."""
    data = DataDir(tmp_path_factory.mktemp("gateway") / "data")
    data.ensure()
    ensure_keys(data.keys)
    inst = Instance(data)
    yield inst
    inst.stop()


@pytest.fixture(scope="module")
def gateway(instance: Instance) -> Iterator[Gateway]:
    """``python -m runtime serve`` in front of ``instance``; it must stop cleanly."""
    gw = Gateway.start(instance.data)
    yield gw
    assert gw.stop() == 0


@pytest.fixture
def start_gateway(instance: Instance) -> Iterator[Callable[..., Gateway]]:
    """Starts more gateways in front of ``instance`` (other options); stopped after."""
    started: list[Gateway] = []

    def start(*args: str) -> Gateway:
        started.append(Gateway.start(instance.data, *args))
        return started[-1]

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway_on() -> Iterator[Callable[..., Gateway]]:
    """Starts gateways in front of a data directory of the test's own (``serve``, or
    with ``command="launch"`` a whole ``launch --serve``); stopped after."""
    started: list[Gateway] = []

    def start(data: DataDir, *args: str, **kwargs: Any) -> Gateway:
        started.append(Gateway.start(data, *args, **kwargs))
        return started[-1]

    yield start
    for gw in started:
        gw.stop()


SseEvents = Callable[[httpx.Response], AsyncIterator[tuple[str, dict[str, Any]]]]


@dataclass
class Scripted:
    """A gateway in front of a bare instance whose controller and narrator the test
    plays on the real bus (the identities the broker authenticates)."""

    client: httpx.AsyncClient
    turns: Subscription  # user.in, acknowledged as the controller would
    narrator: Bus
    gateway: Gateway
    data: DataDir

    async def say(self, turn: m.Envelope, stream: str, seq: int, delta: str, **end: Any) -> None:
        """One narrator chunk answering ``turn``."""
        chunk = m.Chunk(stream=stream, seq=seq, delta=delta, turn=turn.id, **end)
        await self.narrator.publish("user.out", chunk, conversation=turn.conversation)


@asynccontextmanager
async def scripted_gateway(
    tmp_path: Path, gateway_on: Callable[..., Gateway]
) -> AsyncIterator[Scripted]:
    """:class:`Scripted` on an instance with no agents, engine or orchestration."""
    import anyio

    from runtime.embed import Runtime

    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents={}, engine=False, orchestration=False) as rt:
        gw = await anyio.to_thread.run_sync(gateway_on, data)
        await gw.wait_connected()
        async with (
            rt.bus("controller") as controller,
            rt.bus("narrator") as narrator,
            gw.client() as client,
        ):
            yield Scripted(client, controller.subscribe("user.in"), narrator, gw, data)


# every route that needs the token (the page, /login, /healthz and the API docs do not)
TOKEN_ROUTES = [
    ("GET", "/v1/agents"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/logs"),
    ("GET", "/v1/decisions"),
    ("GET", "/v1/events"),
    ("GET", "/metrics"),
    ("POST", "/v1/chat"),
    ("GET", "/v1/chat/c1/tail"),
]


@pytest.fixture
def sse() -> SseEvents:
    """Reads a Server-Sent Events response as (event, data) pairs."""
    return sse_events


def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a Server-Sent Events response, comments skipped."""
    return read_sse(response.aiter_lines())
