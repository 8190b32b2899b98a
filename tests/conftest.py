"""Shared fixtures: a data directory with keys, and a real broker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.keys import ensure_keys
from runtime.paths import DataDir, Endpoints


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    """A fresh data directory with every identity's keys."""
    d = DataDir(tmp_path / "data")
    d.ensure()
    ensure_keys(d.keys)
    return d


class BrokerProcess:
    """A real broker in a child process; restartable for fault tests."""

    def __init__(self, data: DataDir, *extra: str) -> None:
        self.data = data
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Endpoints:
        self.data.endpoints_file.unlink(missing_ok=True)
        self.stderr = self.data.root / "broker.stderr"
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "runtime",
                    "broker",
                    "--data-dir",
                    str(self.data.root),
                    *self.extra,
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + 20
        while not self.data.endpoints_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited: {self.stderr.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("broker did not write endpoints.json")
            time.sleep(0.02)
        return self.data.read_endpoints()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def broker(data: DataDir) -> Iterator[BrokerProcess]:
    """A running broker for ``data``; stopped after the test."""
    b = BrokerProcess(data)
    b.start()
    yield b
    b.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def engine_process(data: DataDir) -> Iterator[subprocess.Popen[bytes]]:
    """The real engine with the default model, serving ``data`` (see ``wait_for_engine``)."""
    with (data.root / "engine.stderr").open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--data-dir", str(data.root)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_for_engine(data: DataDir, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once the engine answers ``stats``; fail with its stderr if it died."""
    import anyio

    from engine.client import Client, EngineUnavailable

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (data.root / "engine.stderr").read_text()[-2000:]
        try:
            async with Client.connect("operator", data.root, timeout=2) as llm:
                await llm.stats()
                return
        except EngineUnavailable:
            await anyio.sleep(0.5)
    raise TimeoutError("the engine did not answer stats")
