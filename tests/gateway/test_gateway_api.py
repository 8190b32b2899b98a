"""The HTTP gateway as a real ``python -m runtime serve`` process in front of a real
instance (broker, controller, narrator, echo agents; no engine, so the narrator answers
every turn with the engine-down notice through the real bus)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import anyio
import httpx2 as httpx

from tests.gateway.conftest import TOKEN_ROUTES

if TYPE_CHECKING:  # the fixtures' types; pytest provides the fixtures themselves
    from conftest import Gateway, SseEvents


async def chat(
    client: httpx.AsyncClient, sse: SseEvents, body: dict[str, Any]
) -> tuple[httpx.Headers, list[tuple[str, dict[str, Any]]]]:
    """POST /v1/chat and every event until the response ends."""
    with anyio.fail_after(60):
        async with client.stream("POST", "/v1/chat", json=body) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            return response.headers, [event async for event in sse(response)]


async def test_healthz_needs_no_token_and_sees_the_bus(gateway: Gateway) -> None:
    await gateway.wait_connected()
    async with gateway.client(auth=False) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "bus": True, "engine": False}


async def test_api_routes_refuse_a_missing_or_wrong_token_with_a_json_401(
    gateway: Gateway,
) -> None:
    async with gateway.client(auth=False) as client:
        for method, path in TOKEN_ROUTES:
            for headers in ({}, {"Authorization": "Bearer not-the-token"}):
                response = await client.request(method, path, headers=headers, json={"text": "hi"})
                assert response.status_code == 401, (method, path)
                assert "token" in response.json()["error"]
        wrong = await client.get("/login", params={"token": "nope"}, follow_redirects=False)
        assert wrong.status_code == 401


async def test_the_login_url_sets_a_strict_http_only_cookie_that_authenticates(
    gateway: Gateway,
) -> None:
    async with gateway.client(auth=False) as client:
        response = await client.get(
            "/login", params={"token": gateway.token}, follow_redirects=False
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"chorus_token={gateway.token};")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        # the client keeps the cookie: the API now answers without a header
        assert (await client.get("/v1/agents")).status_code == 200


async def test_agents_lists_the_workers_from_their_heartbeats(gateway: Gateway) -> None:
    await gateway.wait_connected(("coder", "search", "rag", "controller", "narrator"))
    async with gateway.client() as client:
        agents = {a["name"]: a for a in (await client.get("/v1/agents")).json()["agents"]}
    assert {"coder", "search", "rag", "controller", "narrator"} <= set(agents)
    for name in ("coder", "search", "rag"):
        assert agents[name]["state"] in ("idle", "busy")
        assert agents[name]["last_heartbeat"] is not None
        assert agents[name]["restarts"] == 0
    assert "engine" not in agents  # this instance runs without one


async def test_chat_streams_the_narrators_notice_then_the_final_that_closes_the_turn(
    gateway: Gateway, sse: SseEvents
) -> None:
    await gateway.wait_connected(("controller", "narrator"))
    async with gateway.client() as client:
        headers, events = await chat(client, sse, {"text": "hello!"})
        conversation = headers["x-chorus-conversation"]
        assert [name for name, _ in events] == ["chunk", "final"]
        (_, chunk), (_, final) = events
        assert chunk["conversation"] == final["conversation"] == conversation
        assert chunk["stream"] == final["stream"]
        assert chunk["notice"] is True and chunk["seq"] == 0 and chunk["delta"].strip()
        assert final["finish"] == "error"  # no engine: the playbook answered
        assert final["closes_turn"] is True

        # the conversation is known now: a second turn continues it
        headers, events = await chat(
            client, sse, {"text": "hi again", "conversation": conversation}
        )
        assert headers["x-chorus-conversation"] == conversation
        assert events[-1][0] == "final" and events[-1][1]["closes_turn"]

        # both turns are in the bus log, newest first by default
        with anyio.fail_after(10):
            while True:
                entries = (
                    await client.get(
                        "/v1/logs", params={"conversation": conversation, "topic": "user.in"}
                    )
                ).json()["entries"]
                if len(entries) == 2:
                    break
                await anyio.sleep(0.2)
        assert [e["body"]["text"] for e in entries] == ["hi again", "hello!"]
        assert all(e["sender"] == "client" for e in entries)


async def test_a_conversation_nobody_has_seen_is_404_and_bad_bodies_are_4xx(
    gateway: Gateway,
) -> None:
    async with gateway.client() as client:
        unknown = await client.post("/v1/chat", json={"text": "hi", "conversation": "no-such"})
        assert unknown.status_code == 404
        assert "no-such" in unknown.json()["error"]
        for content, status in (
            (b'{"text": ', 400),  # not JSON
            (b"[1, 2]", 422),  # JSON, not a turn
            (b'{"text": "   "}', 422),  # blank
            (b'{"text": "hi", "conversation": "bad id!"}', 422),
        ):
            response = await client.post(
                "/v1/chat", content=content, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == status, content
            assert isinstance(response.json()["error"], str)
        assert (await client.get("/v1/nothing-here")).status_code == 404
        assert (await client.get("/v1/nothing-here")).json()["error"].startswith("no route")


async def test_a_body_over_the_limit_is_413_whether_announced_or_chunked(
    gateway: Gateway,
) -> None:
    big = b'{"text": "' + b"a" * (64 * 1024) + b'"}'

    async def chunked() -> Any:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    async with gateway.client() as client:
        announced = await client.post(
            "/v1/chat", content=big, headers={"Content-Type": "application/json"}
        )
        streamed = await client.post(
            "/v1/chat", content=chunked(), headers={"Content-Type": "application/json"}
        )
    for response in (announced, streamed):
        assert response.status_code == 413
        assert "bytes" in response.json()["error"]


async def test_cors_is_off_by_default_and_on_for_the_origins_allowed(
    gateway: Gateway, start_gateway: Any
) -> None:
    origin = {"Origin": "http://app.test"}
    async with gateway.client() as client:
        response = await client.get("/v1/agents", headers=origin)
        assert "access-control-allow-origin" not in response.headers
    allowing: Gateway = start_gateway("--allow-origin", "http://app.test")
    async with allowing.client() as client:
        response = await client.get("/v1/agents", headers=origin)
        assert response.headers["access-control-allow-origin"] == "http://app.test"
        assert "X-Chorus-Conversation" in response.headers["access-control-expose-headers"]
        other = await client.get("/v1/agents", headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers


async def test_chat_requests_past_the_rate_limit_get_429(
    start_gateway: Any,
) -> None:
    limited: Gateway = start_gateway("--rate-limit", "2/min")
    await limited.wait_connected()
    async with limited.client() as client:
        # an unknown conversation answers at once (404), after the limit is counted
        statuses = []
        for _ in range(3):
            response = await client.post("/v1/chat", json={"text": "hi", "conversation": "nope"})
            statuses.append(response.status_code)
        assert statuses == [404, 404, 429]
        assert "too many" in response.json()["error"]
        assert int(response.headers["retry-after"]) >= 1
        # other routes are not limited
        assert (await client.get("/v1/agents")).status_code == 200


async def test_events_are_filtered_by_prefix_and_user_out_stays_out_of_the_default_feed(
    gateway: Gateway, sse: SseEvents
) -> None:
    await gateway.wait_connected(("controller", "narrator"))
    async with gateway.client() as client, anyio.create_task_group() as tg:
        topics: dict[str, list[str]] = {"default": [], "decisions": []}

        async def watch(name: str, params: dict[str, Any]) -> None:
            async with client.stream("GET", "/v1/events", params=params) as response:
                assert response.status_code == 200
                async for event, data in sse(response):
                    assert event == data["topic"]
                    topics[name].append(event)
                    if data["body"].get("action") == "finished":
                        return  # the narrator finished speaking: the turn is over

        with anyio.fail_after(60):
            tg.start_soon(watch, "default", {})
            tg.start_soon(watch, "decisions", {"prefix": ["narrator.decision", "narrator.dec"]})
            await anyio.sleep(0.5)  # both feeds subscribed
            await client.post("/v1/chat", json={"text": "hello there"})
    assert set(topics["decisions"]) == {"narrator.decision"}
    # one subscription for overlapping prefixes: no envelope twice
    assert topics["decisions"].count("narrator.decision") == len(topics["decisions"])
    assert "user.in" in topics["default"] and "narrator.cue" in topics["default"]
    assert not any(t.startswith(("user.out", "ack.")) for t in topics["default"])


async def test_logs_and_decisions_take_the_clis_filters(gateway: Gateway) -> None:
    async with gateway.client() as client:
        with anyio.fail_after(10):
            while not (await client.get("/v1/decisions")).json()["decisions"]:
                await client.post("/v1/chat", json={"text": "hello"})
                await anyio.sleep(0.5)
        decisions = (await client.get("/v1/decisions", params={"since": "1h"})).json()
        assert all(d["topic"] == "narrator.decision" for d in decisions["decisions"])
        one = (await client.get("/v1/logs", params={"limit": 1, "sender": "narrator"})).json()
        assert len(one["entries"]) == 1 and one["entries"][0]["sender"] == "narrator"
        oldest = (await client.get("/v1/logs", params={"limit": 3, "order": "oldest"})).json()
        stamps = [e["ts"] for e in oldest["entries"]]
        assert stamps == sorted(stamps)
        text = (await client.get("/v1/logs", params={"text": "HELLO", "topic": "user."})).json()
        assert text["entries"] and all(
            "hello" in e["body"]["text"].lower() for e in text["entries"]
        )
        future = (await client.get("/v1/logs", params={"since": "2999-01-01T00:00"})).json()
        assert future == {"entries": []}
        bad = await client.get("/v1/logs", params={"since": "yesterday-ish"})
        assert bad.status_code == 400 and "10m" in bad.json()["error"]
        too_many = await client.get("/v1/logs", params={"limit": 100_000})
        assert too_many.status_code == 422
        tasks = await client.get("/v1/tasks", params={"state": "running"})
        assert tasks.status_code == 200 and isinstance(tasks.json()["tasks"], list)
        assert (await client.get("/v1/tasks", params={"state": "sleeping"})).status_code == 422


_SAMPLE = re.compile(r'^[a-z_:][a-z0-9_:]*(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+]+$')


async def test_metrics_are_prometheus_text(gateway: Gateway) -> None:
    await gateway.wait_connected(("narrator",))
    async with gateway.client() as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families: dict[str, str] = {}
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families[name] = kind
        elif not line.startswith("# HELP "):
            assert _SAMPLE.match(line), line
            assert line.split("{")[0].split()[0] in families, line
    assert families["chorus_bus_messages_total"] == "counter"
    assert families["chorus_agent_restarts_total"] == "counter"
    assert families["chorus_agent_queue_depth"] == "gauge"
    assert 'chorus_bus_messages_total{topic="heartbeat.narrator"}' in response.text
    assert "chorus_bus_up 1" in response.text


async def test_the_page_routes_answer_without_a_token(gateway: Gateway) -> None:
    async with gateway.client(auth=False) as client:
        page = await client.get("/")
        assert page.status_code in (200, 503)  # 503: the web chat is not built here
        assert "text/html" in page.headers["content-type"]
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "/openapi.json" in docs.text
        assert "cdn." not in docs.text  # Swagger UI is served from the package
        schema = (await client.get("/openapi.json")).json()
        assert "/v1/chat" in schema["paths"]
        assert {"ChunkEvent", "FinalEvent", "InterruptedEvent", "ErrorEvent"} <= set(
            schema["components"]["schemas"]
        )
