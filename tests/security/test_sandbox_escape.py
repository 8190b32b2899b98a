"""The coder's sandbox against the running instance itself. What untrusted code may try
in general (read ``data/keys``, open a network socket, fork-bomb, fill the disk, run
forever) is checked one by one in tests/agents/test_sandbox.py; here, with a real
broker up: the program cannot reach the bus's or the log writer's unix sockets, see
the data directory, or see or signal Chorus's processes."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from agents.sandbox import run_python
from runtime.paths import DataDir
from tests.conftest import BrokerProcess


async def isolation() -> tuple[str, ...]:
    return (await run_python("pass")).isolation


async def test_the_program_cannot_reach_the_instances_sockets_or_files(
    data: DataDir, broker: BrokerProcess
) -> None:
    if "fs" not in await isolation():
        pytest.skip("no private root here: the program sees the host's files")
    sockets = [data.ipc(name).removeprefix("ipc://") for name in ("pub", "sub", "log", "engine")]
    assert all(Path(p).is_socket() for p in sockets[:3])  # noqa: ASYNC240 (the broker's)
    result = await run_python(
        textwrap.dedent(
            f"""
            import os, socket
            for path in {sockets!r}:
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(path)
                    print(path, "connected")
                except OSError as exc:
                    print(path, type(exc).__name__)
            for path in {[str(data.root), str(data.keys), str(data.logs)]!r}:
                print(path, os.path.exists(path))
            """
        )
    )
    assert "connected" not in result.stdout, result
    lines = result.stdout.splitlines()
    assert len(lines) == 7 and all(line.endswith(("FileNotFoundError", "False")) for line in lines)


async def test_the_program_cannot_see_or_signal_chorus_processes(
    data: DataDir, broker: BrokerProcess
) -> None:
    if "pid" not in await isolation():
        pytest.skip("no PID namespace here")
    assert broker.proc is not None
    pids = [broker.proc.pid, os.getpid()]
    result = await run_python(
        textwrap.dedent(
            f"""
            import os, signal
            for pid in {pids!r}:
                try:
                    os.kill(pid, signal.SIGTERM)
                    print(pid, "signalled")
                except OSError as exc:
                    print(pid, type(exc).__name__)
                print(pid, os.path.exists(f"/proc/{{pid}}/environ"))
            """
        )
    )
    assert "signalled" not in result.stdout, result
    assert broker.proc.poll() is None
    assert result.stdout.count("ProcessLookupError") == 2 and "True" not in result.stdout
