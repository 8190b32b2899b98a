"""The sandbox stops what untrusted code may try: running forever, burning CPU, eating
memory, filling the disk, fork bombs, the network, reading secrets; and a cancelled
run leaves nothing behind. Every test runs real programs, no model."""

from __future__ import annotations

import socket
import tempfile
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import psutil
import pytest

from agents.sandbox import SandboxResult, run_python
from runtime.paths import DataDir

MARK = "SANDBOX_TEST_MARK"


def marked(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark`` (zombies cannot be read)."""
    pids = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


async def until(condition: Callable[[], bool], timeout: float) -> None:
    """Poll ``condition``: processes come and go with no event to wait on."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.05)


def run_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("chorus-sandbox-*"))


async def isolation() -> tuple[str, ...]:
    return (await run_python("pass")).isolation


def program(source: str) -> str:
    return textwrap.dedent(source).strip() + "\n"


async def test_stdout_stderr_and_exit_status_come_back() -> None:
    result = await run_python(
        program(
            """
            import sys
            print("to stdout")
            print("to stderr", file=sys.stderr)
            sys.exit(3)
            """
        )
    )
    assert result.stdout == "to stdout\n"
    assert result.stderr == "to stderr\n"
    assert result.exit_code == 3 and not result.ok
    assert not result.timed_out and result.killed_by is None
    assert result.describe() == "exited with status 3"


async def test_an_uncaught_exception_is_a_failure_with_its_traceback() -> None:
    result = await run_python("1 / 0\n")
    assert result.exit_code == 1
    assert "ZeroDivisionError" in result.stderr


async def test_wall_clock_timeout_kills_an_infinite_loop() -> None:
    result = await run_python("while True: pass\n", timeout_s=1, cpu_s=30)
    assert result.timed_out and result.killed_by == "timeout"
    assert result.exit_code < 0 and not result.ok
    assert result.duration_s < 3


async def test_wall_clock_timeout_stops_a_program_that_only_sleeps() -> None:
    result = await run_python("import time\ntime.sleep(3600)\n", timeout_s=0.5)
    assert result.timed_out and "timed out" in result.describe()
    assert result.duration_s < 2.5


async def test_cpu_time_limit_kills_a_busy_program() -> None:
    result = await run_python("while True: pass\n", cpu_s=1, timeout_s=20)
    assert not result.timed_out
    assert result.killed_by == "cpu", result  # not the 20 s wall clock


async def test_memory_limit_stops_a_2_gb_allocation() -> None:
    result = await run_python("data = bytearray(2 * 1024**3)\nprint('allocated')\n")
    assert "allocated" not in result.stdout
    assert "MemoryError" in result.stderr and result.exit_code == 1


async def test_file_size_limit_stops_a_100_mb_file() -> None:
    result = await run_python(
        program(
            """
            import os
            with open("big", "wb") as f:
                for _ in range(100):
                    f.write(b"x" * 1024 * 1024)
            """
        ),
        file_mb=16,
    )
    assert result.exit_code == 1
    assert "File too large" in result.stderr


async def test_many_files_cannot_fill_the_disk() -> None:
    if "fs" not in await isolation():
        pytest.skip("no private tmpfs root here: only RLIMIT_FSIZE bounds each file")
    result = await run_python(
        program(
            """
            written = 0
            try:
                for i in range(100):  # 1 GB in 10 MB files, everywhere writable
                    for where in ("", "/tmp/", "/dev/shm/"):
                        with open(f"{where}f{i}", "wb") as f:
                            f.write(b"x" * 10 * 1024 * 1024)
                        written += 10
            except OSError as exc:
                print(written, exc.strerror)
            """
        ),
        disk_mb=64,
    )
    written, _, reason = result.stdout.strip().partition(" ")
    assert int(written) <= 64 and reason == "No space left on device", result


async def test_a_fork_bomb_is_contained_and_nothing_survives() -> None:
    """Each child leaves the process group (setsid) and sleeps: only the process limit
    stops the forking, and only the PID namespace (or the throwaway uid) can find them."""
    found = await isolation()
    if "pid" not in found and "uid" not in found:
        pytest.skip("no PID namespace and not root: setsid children could escape the kill")
    mark = uuid.uuid4().hex
    result = await run_python(
        program(
            """
            import os, time
            forked = 0
            for _ in range(200):
                try:
                    pid = os.fork()
                except OSError:
                    break
                if pid == 0:
                    os.setsid()
                    time.sleep(60)
                    os._exit(0)
                forked += 1
            print(forked, flush=True)
            time.sleep(0.5)
            """
        ),
        max_procs=16,
        timeout_s=20,
        env={MARK: mark},
    )
    assert result.exit_code == 0, result
    assert 0 < int(result.stdout) < 16
    await until(lambda: not marked(mark), 5)


async def test_the_network_is_cut() -> None:
    if "net" not in await isolation():
        pytest.skip("no network namespace on this OS or for this user")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = await run_python(
            program(
                f"""
                import socket
                for host in ("127.0.0.1", "1.1.1.1"):
                    try:
                        socket.create_connection((host, {port}), timeout=2).close()
                        print(host, "connected")
                    except OSError as exc:
                        print(host, "refused", exc.errno)
                """
            )
        )
        assert "connected" not in result.stdout, result
        assert result.stdout.count("refused") == 2
        with pytest.raises(BlockingIOError):
            listener.accept()


async def test_the_environment_carries_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORUS_SECRET", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter3")
    result = await run_python(
        "import os, sys\nprint(sorted(os.environ.items()))\nprint(os.getcwd() == os.environ['HOME'])\n"
    )
    assert "hunter" not in result.stdout and "CHORUS" not in result.stdout
    assert "SECRET" not in result.stdout
    assert result.stdout.splitlines()[-1] == "True"  # HOME is the program's own directory


async def test_secret_keys_outside_cannot_be_read(data: DataDir, tmp_path: Path) -> None:
    """The instance's CURVE keys, and a 0600 root file in an open directory."""
    found = await isolation()
    if "fs" not in found and "uid" not in found:
        pytest.skip("no private root and not root: the program runs as the keys' owner")
    loose = tmp_path / "open"
    loose.mkdir(mode=0o755)
    secret = loose / "secret.key"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    targets = [str(p) for p in sorted(data.keys.iterdir())] + [str(secret)]
    result = await run_python(
        program(
            f"""
            for path in {targets!r}:
                try:
                    print(path, open(path).read())
                except OSError as exc:
                    print(path, "denied", type(exc).__name__)
            """
        )
    )
    lines = result.stdout.splitlines()
    assert len(lines) == len(targets) and all("denied" in line for line in lines), result


async def test_output_is_capped_with_a_marker() -> None:
    result = await run_python("print('x' * 200_000)\n", output_bytes=1000)
    assert result.ok and result.truncated == ("stdout",)
    assert result.stdout.startswith("x" * 1000)
    assert "more bytes not kept" in result.stdout and len(result.stdout) < 1100


async def test_cancelling_a_run_kills_the_program() -> None:
    mark = uuid.uuid4().hex
    finished: list[SandboxResult] = []

    async def run() -> None:
        finished.append(await run_python("import time\ntime.sleep(60)\n", env={MARK: mark}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await until(lambda: bool(marked(mark)), 10)
        tg.cancel_scope.cancel()
    assert not finished
    await until(lambda: not marked(mark), 5)


async def test_each_run_gets_a_fresh_directory_that_is_removed_after() -> None:
    before = run_dirs()
    await run_python("open('left.txt', 'w').write('x')\n")
    second = await run_python("import os\nprint(os.listdir('.'))\n")
    assert second.stdout.strip() == "['program.py']"
    assert run_dirs() <= before
