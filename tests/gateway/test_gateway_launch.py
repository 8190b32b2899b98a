"""``launch --serve``: the gateway inside the launch process, in front of the real
agents; one signal stops the gateway and every child."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from runtime.paths import DataDir

if TYPE_CHECKING:
    from conftest import Gateway, SseEvents


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "lists.md").write_text("# Lists\n\nA list is a mutable sequence of items.\n")
    return corpus


async def _ask(gw: Gateway, sse: SseEvents, text: str) -> list[tuple[str, dict[str, Any]]]:
    async with gw.client() as client, client.stream("POST", "/v1/chat", json={"text": text}) as r:
        assert r.status_code == 200
        return [event async for event in sse(r)]


async def test_launch_serve_runs_the_gateway_beside_every_process_and_one_signal_stops_all(
    tmp_path: Path, sse: SseEvents, gateway_on: Callable[..., Gateway]
) -> None:
    data = DataDir(tmp_path / "data")
    corpus = _corpus(tmp_path)
    gw = await anyio.to_thread.run_sync(
        lambda: gateway_on(
            data, "--no-engine", "--corpus", str(corpus), command="launch", timeout=90
        )
    )
    try:
        await gw.wait_connected(("controller", "narrator"))
        with anyio.fail_after(60):
            events = await _ask(gw, sse, "hello!")
        assert events[-1][0] == "final" and events[-1][1]["closes_turn"]
    finally:
        code = await anyio.to_thread.run_sync(gw.stop)
    assert code == 0
    assert not data.endpoints_file.exists()  # the supervisor cleaned up after the children


@pytest.mark.slow
async def test_a_real_model_answers_through_post_v1_chat(
    tmp_path: Path, sse: SseEvents, gateway_on: Callable[..., Gateway]
) -> None:
    data = DataDir(tmp_path / "data")
    corpus = _corpus(tmp_path)
    gw = await anyio.to_thread.run_sync(
        lambda: gateway_on(data, "--corpus", str(corpus), command="launch", timeout=300)
    )
    try:
        await gw.wait_connected(("controller", "narrator"))
        with anyio.fail_after(240):
            events = await _ask(gw, sse, "Hello! How are you today?")
    finally:
        await anyio.to_thread.run_sync(gw.stop)
    text = "".join(data["delta"] for name, data in events if name == "chunk" and not data["notice"])
    assert text.strip(), events
    finals = [data for name, data in events if name == "final"]
    assert finals[-1]["closes_turn"] and finals[-1]["finish"] == "done", events
