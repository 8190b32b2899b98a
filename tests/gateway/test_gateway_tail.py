"""A client that lost its chat response asks the gateway for the rest of the answer
(``GET /v1/chat/{conversation}/tail``). The test plays the controller and the narrator
on a real bus, so it decides which chunks are said while no client listens."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from tests.gateway.conftest import scripted_gateway

if TYPE_CHECKING:
    from conftest import Gateway, SseEvents

Events = list[tuple[str, dict[str, Any]]]


def _said(events: Events) -> list[tuple[str, str, int | None, str]]:
    """Each event as (event, stream, seq, delta) (the last two for chunks only)."""
    return [
        (name, data.get("stream", ""), data.get("seq"), data.get("delta", ""))
        for name, data in events
    ]


async def test_the_rest_of_a_lost_answer_is_replayed_then_followed_live(
    tmp_path: Path, gateway_on: Callable[..., Gateway], sse: SseEvents
) -> None:
    async with scripted_gateway(tmp_path, gateway_on) as gw:
        client, turns, say = gw.client, gw.turns, gw.say

        async def tail(
            events: Events,
            conversation: str,
            query: dict[str, Any] | None = None,
            after_two: anyio.Event | None = None,
        ) -> None:
            url = f"/v1/chat/{conversation}/tail"
            async with client.stream("GET", url, params=query) as response:
                assert response.status_code == 200, await response.aread()
                async for event in sse(response):
                    events.append(event)
                    if after_two is not None and len(events) == 2:
                        after_two.set()

        with anyio.fail_after(30):
            # the first response is dropped by the client after the answer's first chunk
            lost: Events = []
            async with anyio.create_task_group() as tg:

                async def post() -> None:
                    body = {"text": "tell me"}
                    async with client.stream("POST", "/v1/chat", json=body) as response:
                        async for event in sse(response):
                            lost.append(event)
                            if event[0] == "chunk" and event[1]["stream"] == "a1":
                                return  # the connection is gone

                tg.start_soon(post)
                turn = await turns.receive()
                await say(turn, "n1", 0, "Working on it.", notice=True)
                await say(turn, "n1", 1, "", final=True, finish="done")
                await say(turn, "a1", 0, "Hello")
            conversation = lost[0][1]["conversation"]
            await say(turn, "a1", 1, " world")  # nobody listens
            await say(turn, "a1", 2, "!")

            # the rest, from the last chunk seen: held chunks, then the live final
            rest: Events = []
            async with anyio.create_task_group() as tg:
                two = anyio.Event()
                tg.start_soon(tail, rest, conversation, {"stream": "a1", "after": 0}, two)
                await two.wait()
                await say(turn, "a1", 3, "", final=True, finish="done", closes_turn=True)
            assert _said(rest) == [
                ("chunk", "a1", 1, " world"),
                ("chunk", "a1", 2, "!"),
                ("final", "a1", None, ""),
            ]
            assert rest[-1][1]["closes_turn"] is True

            # the whole turn, from the gateway's memory alone (it has closed)
            whole: Events = []
            await tail(whole, conversation)
            assert _said(whole) == [
                ("chunk", "n1", 0, "Working on it."),
                ("final", "n1", None, ""),
                ("chunk", "a1", 0, "Hello"),
                ("chunk", "a1", 1, " world"),
                ("chunk", "a1", 2, "!"),
                ("final", "a1", None, ""),
            ]
            assert whole[0][1]["notice"] is True

            # a turn a newer one superseded ends with `interrupted`, not a wait
            async with anyio.create_task_group() as tg:
                for text in ("second", "third"):
                    body = {"text": text, "conversation": conversation}
                    tg.start_soon(functools.partial(client.post, "/v1/chat", json=body))
                    if text == "second":
                        second = await turns.receive()
                        await say(second, "b1", 0, "Part")
                third = await turns.receive()
                await say(third, "c1", 0, "Done.", final=True, finish="done", closes_turn=True)
            cut: Events = []
            await tail(cut, conversation, {"stream": "b1", "after": -1})
            assert _said(cut) == [("chunk", "b1", 0, "Part"), ("interrupted", "b1", None, "")]

        unknown = await client.get("/v1/chat/nope/tail")
        assert unknown.status_code == 404
        assert "holds no answer of conversation 'nope'" in unknown.json()["error"]
        lost_stream = await client.get(f"/v1/chat/{conversation}/tail?stream=zz")
        assert lost_stream.status_code == 404
        assert "no stream 'zz'" in lost_stream.json()["error"]


async def test_a_restarted_gateway_gives_the_tail_said_while_it_was_down(
    tmp_path: Path, gateway_on: Callable[..., Gateway], sse: SseEvents
) -> None:
    async with scripted_gateway(tmp_path, gateway_on) as gw:
        with anyio.fail_after(60):
            conversation = ""
            async with anyio.create_task_group() as tg:

                async def post() -> None:
                    nonlocal conversation
                    body = {"text": "tell me"}
                    async with gw.client.stream("POST", "/v1/chat", json=body) as response:
                        conversation = response.headers["x-chorus-conversation"]
                        async for name, _ in sse(response):
                            if name == "chunk":
                                return  # the page goes away with the gateway

                tg.start_soon(post)
                turn = await gw.turns.receive()
                await gw.say(turn, "a1", 0, "Hello")
            assert await anyio.to_thread.run_sync(gw.gateway.stop) == 0
            await gw.say(turn, "a1", 1, " again")  # no gateway runs: the bus log has it
            await gw.say(turn, "a1", 2, "", final=True, finish="done", closes_turn=True)

            again = await anyio.to_thread.run_sync(gateway_on, gw.data)
            await again.wait_connected()
            async with again.client() as client:
                url = f"/v1/chat/{conversation}/tail"
                query = {"stream": "a1", "after": 0}
                async with client.stream("GET", url, params=query) as response:
                    assert response.status_code == 200, await response.aread()
                    rest = [event async for event in sse(response)]
    assert _said(rest) == [("chunk", "a1", 1, " again"), ("final", "a1", None, "")]
