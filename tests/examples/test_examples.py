"""The examples run as a user would run them: the embedding app and the plain monitor."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import anyio

from runtime import messages as m
from runtime.bus import Bus
from runtime.paths import DataDir
from tests.conftest import pid_alive

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get_json(url: str, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                result: dict[str, object] = json.load(response)
                return result
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def test_embedded_app_runs_chorus_and_a_plain_monitor_watches_it(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    port = free_port()
    log = (tmp_path / "app.log").open("wb")
    app = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "embed_in_app.py"),
            "--data-dir",
            str(data.root),
            "--port",
            str(port),
            "--no-engine",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    monitor = None
    try:
        status = get_json(f"http://127.0.0.1:{port}/status")
        processes = status["processes"]
        assert isinstance(processes, dict) and "broker" in processes
        broker_pid = processes["broker"]["pid"]
        monitor = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "monitor.py"), str(data.root), "event."],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert monitor.stdout is not None
        # one reader thread for the monitor's whole output: a blocked readline cannot be
        # cancelled, so the test waits on a queue with a timeout instead
        lines: queue.Queue[str] = queue.Queue()
        out = monitor.stdout
        threading.Thread(target=lambda: [lines.put(x) for x in out], daemon=True).start()
        async with Bus("coder", data.read_endpoints(), data.keys) as coder:
            with anyio.fail_after(60):
                line = ""
                while "hello-monitor" not in line:
                    await coder.publish("event.coder", m.Note(name="hello-monitor"))
                    try:
                        line = await anyio.to_thread.run_sync(lambda: lines.get(timeout=0.5))
                    except queue.Empty:
                        line = ""
        assert "event.coder" in line and "Note" in line
    finally:
        if monitor is not None:
            monitor.kill()
            monitor.wait()
            assert monitor.stdout is not None
            monitor.stdout.close()
        app.send_signal(signal.SIGINT)
        assert app.wait(timeout=30) == 0
        log.close()
    assert not pid_alive(broker_pid)
    assert not data.endpoints_file.exists()
