"""A second turn on a conversation preempts the first, and the first response always
ends. The test plays the controller and the narrator on a real bus (the identities the
broker authenticates), so it decides exactly when each chunk is said."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from tests.gateway.conftest import scripted_gateway

if TYPE_CHECKING:
    from conftest import Gateway, SseEvents

Events = list[tuple[str, dict[str, Any]]]


async def _two_turns(
    tmp_path: Path,
    gateway_on: Callable[..., Gateway],
    sse: SseEvents,
    *,
    narrator_preempts: bool,
) -> tuple[Events, Events]:
    """Turn 1 starts streaming; turn 2 arrives on the same conversation; the scripted
    narrator cuts turn 1 (or, when ``narrator_preempts`` is false, never ends it) and
    answers turn 2. Returns both responses' events."""
    async with scripted_gateway(tmp_path, gateway_on) as gw:
        client, turns, say = gw.client, gw.turns, gw.say
        first: Events = []
        second: Events = []
        conversation: list[str] = []
        first_spoke = anyio.Event()

        async def post(events: Events, body: dict[str, Any]) -> None:
            async with client.stream("POST", "/v1/chat", json=body) as response:
                assert response.status_code == 200
                conversation.append(response.headers["x-chorus-conversation"])
                async for event in sse(response):
                    events.append(event)
                    first_spoke.set()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(post, first, {"text": "tell me a long story"})
                turn1 = await turns.receive()
                await say(turn1, "s1", 0, "Once upon a time")
                await first_spoke.wait()
                tg.start_soon(post, second, {"text": "stop", "conversation": conversation[0]})
                turn2 = await turns.receive()
                assert turn2.conversation == turn1.conversation == conversation[0]
                if narrator_preempts:  # as orchestrator.narrator does on a preempt cue
                    await say(
                        turn1, "s1", 1, "", final=True, finish="interrupted", closes_turn=True
                    )
                await say(turn2, "s2", 0, "Stopped.")
                await say(turn2, "s2", 1, "", final=True, finish="done", closes_turn=True)
    return first, second


async def test_the_narrators_interruption_ends_the_first_response(
    tmp_path: Path, gateway_on: Callable[..., Gateway], sse: SseEvents
) -> None:
    first, second = await _two_turns(tmp_path, gateway_on, sse, narrator_preempts=True)
    conversation = first[0][1]["conversation"]
    assert first == [
        (
            "chunk",
            {
                "conversation": conversation,
                "stream": "s1",
                "seq": 0,
                "delta": "Once upon a time",
                "notice": False,
            },
        ),
        ("interrupted", {"conversation": conversation, "stream": "s1"}),
    ]
    assert [name for name, _ in second] == ["chunk", "final"]
    assert second[1][1] == {
        "conversation": conversation,
        "stream": "s2",
        "finish": "done",
        "sources": [],
        "closes_turn": True,
    }


async def test_a_superseded_response_ends_even_when_the_narrator_never_says_so(
    tmp_path: Path, gateway_on: Callable[..., Gateway], sse: SseEvents
) -> None:
    first, second = await _two_turns(tmp_path, gateway_on, sse, narrator_preempts=False)
    assert [name for name, _ in first] == ["chunk", "interrupted"]
    assert first[-1][1]["stream"] == "s1"
    assert [name for name, _ in second] == ["chunk", "final"]
