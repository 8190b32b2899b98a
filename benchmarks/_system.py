"""The whole system under test for the harnesses (faults, load): ``python -m runtime
launch`` and a ``python -m runtime serve`` gateway, each its own process in its own
session (so a harness can signal one without touching itself), on one data directory.

Their output goes to ``data/logs/process/harness-launch.out`` and ``harness-gateway.out``.
The gateway keeps its port across restarts (a fault harness restarts it the way a
service manager would).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

import anyio
import httpx2 as httpx
import psutil

from runtime.paths import DataDir

START_TIMEOUT_S = 600.0  # the engine converts the model on a cold cache
GATEWAY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class System:
    """Start with ``await start()``, stop with ``await stop()``. ``env`` is added to this
    process's environment for both; ``gateway_args`` go to ``runtime serve``."""

    def __init__(
        self,
        data: DataDir,
        *,
        env: Mapping[str, str] | None = None,
        gateway_args: Sequence[str] = (),
    ) -> None:
        self.data = data
        self.env = {**os.environ, **(env or {})}
        self.gateway_args = tuple(gateway_args)
        self.port = free_port()
        self.launch: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.data.keys / "gateway.token").read_text().strip()

    async def start(self) -> None:
        """Launch, wait for "Chorus is up", then start the gateway and wait for it."""
        self.launch = self._spawn("launch", "--log-json", out="harness-launch.out")
        out = self.data.process_logs / "harness-launch.out"
        with anyio.fail_after(START_TIMEOUT_S):
            while b"Chorus is up" not in out.read_bytes():
                if self.launch.poll() is not None:
                    raise RuntimeError(f"launch exited: {out.read_text()[-2000:]}")
                await anyio.sleep(0.2)
        await self.start_gateway()

    async def start_gateway(self) -> None:
        """(Re)start the gateway on its port; return once ``/healthz`` answers."""
        self.gateway = self._spawn(
            "serve",
            "--log-json",
            *("--port", str(self.port), *self.gateway_args),
            out="harness-gateway.out",
        )
        async with httpx.AsyncClient(timeout=2) as client:
            with anyio.fail_after(GATEWAY_TIMEOUT_S):
                while True:
                    if self.gateway.poll() is not None:
                        raise RuntimeError(f"the gateway exited with {self.gateway.returncode}")
                    try:
                        if (await client.get(f"{self.url}/healthz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.2)

    def _spawn(self, *args: str, out: str) -> subprocess.Popen[bytes]:
        self.data.process_logs.mkdir(parents=True, exist_ok=True)
        with (self.data.process_logs / out).open("ab") as f:
            return subprocess.Popen(
                [sys.executable, "-m", "runtime", *args, "--data-dir", str(self.data.root)],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def family(self) -> list[psutil.Process]:
        """launch, the gateway and every live process below them."""
        roots = [p for p in (self.launch, self.gateway) if p is not None and p.poll() is None]
        procs = []
        for root in roots:
            try:
                top = psutil.Process(root.pid)
                procs += [top, *top.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return procs

    def processes(self) -> dict[str, psutil.Process]:
        """Each live process by its role (``role_of``); zombies are left out."""
        found: dict[str, psutil.Process] = {}
        for p in self.family():
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                role = role_of(p.cmdline())
            except psutil.Error:
                continue
            if role is not None:
                found[role] = p
        return found

    def pid_of(self, role: str) -> int | None:
        proc = self.processes().get(role)
        return None if proc is None else int(proc.pid)

    async def stop(self) -> None:
        """SIGTERM the gateway and launch; SIGKILL what is still up after 30 s."""
        procs = [p for p in (self.gateway, self.launch) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            with anyio.move_on_after(STOP_TIMEOUT_S):
                while proc.poll() is None:  # noqa: ASYNC110 (a child process signals nothing)
                    await anyio.sleep(0.1)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def role_of(cmdline: Sequence[str]) -> str | None:
    """``broker``, ``engine``, ``controller``, ``narrator``, an agent's name,
    ``supervisor`` (launch), ``gateway`` (serve), ``log-writer``; None for anything else
    (a sandboxed program)."""
    args = list(cmdline[1:])
    if "-m" not in args:
        return None
    module, rest = args[args.index("-m") + 1], args[args.index("-m") + 2 :]
    command = rest[0] if rest else ""
    match module, command:
        case "runtime", "launch":
            return "supervisor"
        case "runtime", "serve":
            return "gateway"
        case "runtime", "broker":
            return "broker"
        case "runtime", "agent":
            return rest[1] if len(rest) > 1 else "agent"
        case "engine", "serve":  # a canary's second engine names itself
            return "engine-candidate" if "engine-candidate" in rest else "engine"
        case "orchestrator", ("controller" | "narrator"):
            return command
        case "orchestrator.log.process", _:
            return "log-writer"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
