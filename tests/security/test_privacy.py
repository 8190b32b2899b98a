"""Keys and logs: private key files stay private, no secret reaches a log, and
``--log-redact`` keeps what the user typed and what the narrator said out of the bus log.

The log checks run after a real conversation through the gateway of the package's
instance (its broker runs with ``CHORUS_LOG_REDACT=true``), with failed logins and wrong
tokens on the way so that the gateway's error paths write what they write too."""

from __future__ import annotations

import gzip
import json
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import zmq.auth

from orchestrator.log.writer import redact_text
from runtime.acl import IDENTITIES
from runtime.keys import ensure_keys
from runtime.paths import DataDir
from tests.gateway.conftest import sse_events

from .conftest import Served

REDACTED = "<redacted sha256:"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_files_are_0600_in_a_0700_folder_and_stay_so(data: DataDir) -> None:
    """``ensure_keys`` runs at every start: a key file that a copy left readable to others
    is put back to 0600, the folder to 0700 (the gateway token: see
    tests/gateway/test_gateway_units.py::test_the_token_is_made_once_private_and_kept)."""
    assert mode(data.keys) == 0o700
    for name in IDENTITIES:
        assert mode(data.keys / f"{name}.key_secret") == 0o600, name
    careless = data.keys / "coder.key_secret"
    careless.chmod(0o644)
    data.keys.chmod(0o755)
    before = careless.read_bytes()
    ensure_keys(data.keys)
    assert mode(careless) == 0o600 and mode(data.keys) == 0o700
    assert careless.read_bytes() == before  # kept, not replaced: peers still trust it


def test_the_folders_that_hold_sockets_and_conversations_are_owner_only(data: DataDir) -> None:
    for folder in (data.keys, data.run, data.logs, data.summaries):
        folder.chmod(0o755)
    data.ensure()
    for folder in (data.keys, data.run, data.logs, data.summaries):
        assert mode(folder) == 0o700, folder


def secrets_of(data: DataDir) -> dict[str, str]:
    """Every secret an instance has: each identity's private key (z85) and the gateway
    token."""
    found = {}
    for path in sorted(data.keys.glob("*.key_secret")):
        _, secret = zmq.auth.load_certificate(str(path))
        assert secret is not None
        found[path.name] = secret.decode()
    found["gateway.token"] = (data.keys / "gateway.token").read_text().strip()
    return found


def every_log(data: DataDir) -> Iterator[tuple[Path, str]]:
    """Each file an instance writes besides its keys, as text (compressed logs opened):
    the bus log, each process's log and stderr, summaries, the task graph, run files;
    and the gateway's and the instance's stderr next to the data folder."""
    for path in sorted([*data.root.rglob("*"), *data.root.parent.glob("*.stderr")]):
        if not path.is_file() or path.is_socket() or data.keys in path.parents:
            continue
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        yield path, raw.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def conversation(served: Served) -> tuple[str, str]:
    """One answered turn with a text worth hiding, after failed logins and wrong tokens;
    returns (conversation id, the text)."""
    text = f"my card number is 4111 1111 1111 1111, code {uuid.uuid4().hex[:8]}"

    async def talk() -> str:
        async with served.gateway.client(auth=False) as stranger:
            await stranger.get("/login", params={"token": "guess"})
            await stranger.get("/v1/agents", headers={"Authorization": "Bearer guess"})
        async with served.gateway.client() as client:
            with anyio.fail_after(60):
                async with client.stream("POST", "/v1/chat", json={"text": text}) as response:
                    assert response.status_code == 200
                    events = [event async for event in sse_events(response)]
                    assert events[-1][0] == "final" and events[-1][1]["closes_turn"]
                    return response.headers["x-chorus-conversation"]

    conversation = anyio.run(talk)
    bus_log(served.data, conversation, until_final=True)
    return conversation, text


def bus_log(data: DataDir, conversation: str, until_final: bool = False) -> list[dict[str, Any]]:
    """The bus log's envelopes of ``conversation``; with ``until_final``, wait until the
    writer has flushed the narrator's last chunk of the turn (the writer batches)."""
    deadline = time.monotonic() + 30
    while True:
        lines = [
            json.loads(line)
            for path in sorted(data.logs.glob("*.jsonl"))
            for line in path.read_text().splitlines()
            if line.strip()
        ]
        mine = [e for e in lines if e.get("conversation") == conversation]
        closed = any(e["body"].get("closes_turn") and e["body"].get("final") for e in mine)
        if not until_final or closed:
            return mine
        assert time.monotonic() < deadline, "the turn never reached the bus log"
        time.sleep(0.1)


def test_no_private_key_or_token_appears_in_any_log(
    served: Served, conversation: tuple[str, str]
) -> None:
    secrets = secrets_of(served.data)
    assert len(secrets) == len(IDENTITIES) + 1
    checked = 0
    for path, text in every_log(served.data):
        checked += 1
        for name, secret in secrets.items():
            assert secret not in text, f"{name} is written in {path}"
    assert checked >= 10  # the bus log, every process's log: the search did find files


def test_log_redact_hashes_what_the_user_typed_and_the_narrator_said(
    served: Served, conversation: tuple[str, str]
) -> None:
    """The fields ``--log-redact`` covers (docs/data.md): ``UserTurn.text``,
    ``Chunk.delta``, ``Cue.user_text`` and ``TaskAssign.text``. An agent's result may
    quote the user (the echo agents here do), and that is not redacted: see
    docs/security.md."""
    conversation_id, text = conversation
    envelopes = bus_log(served.data, conversation_id)
    seen: set[str] = set()
    for envelope in envelopes:
        body = envelope["body"]
        for kind, field in (
            ("UserTurn", "text"),
            ("Chunk", "delta"),
            ("Cue", "user_text"),
            ("TaskAssign", "text"),
        ):
            if body["type"] == kind and body[field]:
                seen.add(kind)
                assert body[field].startswith(REDACTED), (kind, body[field])
    assert {"UserTurn", "Chunk", "TaskAssign"} <= seen, seen
    turn = next(e for e in envelopes if e["body"]["type"] == "UserTurn")
    assert turn["body"]["text"] == redact_text(text)  # equal texts keep equal hashes
    for path, content in every_log(served.data):
        if path.parent == served.data.process_logs:
            assert text not in content, f"the user's text is in {path}"
