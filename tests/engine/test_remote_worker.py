"""A worker on another host reaches the engine its instance names in ``endpoints.json``:
the engine on ``tcp://`` (``serve --bind``), the broker naming it (``--engine-endpoint``),
and an agent that has only a copy of ``endpoints.json`` and its keys — no data dir, no
engine socket beside it. Real broker, real agent process, the real engine server on a
tiny random model (what is tested is the connection, not the model)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import anyio
from transformers import PreTrainedTokenizerFast

from engine.server import EngineConfig
from runtime import messages as m
from runtime.bus import Bus
from runtime.paths import DataDir
from tests.conftest import BrokerProcess
from tests.engine.conftest import serving_tiny

ENDED = ("result", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def other_host(data: DataDir, root: Path) -> Path:
    """What a worker's host gets: ``endpoints.json`` and the keys it needs; the path of
    the copied ``endpoints.json``."""
    (root / "run").mkdir(parents=True)
    (root / "keys").mkdir(mode=0o700)
    for name in ("coder.key", "coder.key_secret", "broker.key", "engine.key"):
        shutil.copy2(data.keys / name, root / "keys" / name)
    return Path(shutil.copy(data.endpoints_file, root / "run" / "endpoints.json"))


async def test_a_worker_on_another_host_reaches_the_engine_over_tcp(
    data: DataDir, tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker = BrokerProcess(data, "--engine-endpoint", endpoint)
    broker.start()
    config = EngineConfig(sink=2, window=30, idle_s=60, max_append_tokens=400)
    remote = tmp_path / "remote"
    endpoints = other_host(data, remote)
    with serving_tiny(data, tiny_tokenizer, config, endpoint=endpoint) as server:
        with (remote / "agent.stderr").open("ab") as err:
            agent = subprocess.Popen(
                [
                    *(sys.executable, "-m", "runtime", "agent", "coder"),
                    *("--connect", str(endpoints), "--impl", "agents.testing:EngineProbeAgent"),
                ],
                env={**os.environ, "CHORUS_DATA_DIR": str(remote)},  # no engine socket there
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            async with Bus("controller", data.read_endpoints(), data.keys) as bus:
                with bus.subscribe("task.update") as updates, bus.subscribe("heartbeat.") as beats:
                    with anyio.fail_after(30):
                        await beats.receive()  # the agent is up
                    assign = m.TaskAssign(task="t1", kind="probe", text="The quick brown fox")
                    await bus.publish("task.assign.coder", assign, conversation="c1")
                    with anyio.fail_after(30):
                        async for env in updates:
                            if isinstance(env.body, m.TaskUpdate) and env.body.state in ENDED:
                                done = env.body
                                break
            assert done.state == "result", done.message
            assert done.data["endpoint"] == endpoint
            assert server.tokens_generated > 0  # the tiny engine did the work
        finally:
            agent.kill()
            agent.wait()
            broker.stop()
