"""The HTTP gateway against hostile clients, as a real ``python -m runtime serve`` in front
of a real instance: tokens missing, wrong or in the wrong place; one conversation's
stream never carrying another's; bodies and requests over the limits; floods of
Server-Sent Event connections; and hypothesis throwing garbage at every route, which
must answer 4xx (JSON), never 5xx."""

from __future__ import annotations

import base64
import string
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import quote

import anyio
import httpx2 as httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.gateway.options import DEFAULT_MAX_STREAMS
from tests.gateway.conftest import TOKEN_ROUTES, sse_events

from .conftest import Served

STREAMS_PER_TOKEN = DEFAULT_MAX_STREAMS  # the default `serve` runs with


async def status_of(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> int:
    """The status of a request whose answer may be an endless stream (not read)."""
    async with client.stream(method, path, **kwargs) as response:
        return response.status_code


async def test_no_token_a_wrong_one_or_one_in_the_wrong_place_is_401(served: Served) -> None:
    token = served.gateway.token
    basic = base64.b64encode(f"chorus:{token}".encode()).decode()
    wrong: list[dict[str, Any]] = [
        {},
        {"headers": {"Authorization": "Bearer not-the-token"}},
        {"headers": {"Authorization": f"Bearer {token}x"}},
        {"headers": {"Authorization": f"Bearer {token[:-1]}"}},
        {"headers": {"Authorization": f"Bearer {token.upper()}"}},
        {"headers": {"Authorization": "Bearer"}},
        {"headers": {"Authorization": token}},  # no scheme
        {"headers": {"Authorization": f"Basic {basic}"}},
        {"headers": {"X-Api-Key": token}},
        {"headers": {"Cookie": "chorus_token=not-the-token"}},
        {"params": {"token": token}},  # only /login takes it from the URL
    ]
    async with served.gateway.client(auth=False) as client:
        for method, path in TOKEN_ROUTES:
            for attempt in wrong:
                response = await client.request(method, path, json={"text": "hi"}, **attempt)
                assert response.status_code == 401, (method, path, attempt)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "token" in response.json()["error"]
        # the control: the right token, in the header or the cookie, gets in
        assert (
            await client.get("/v1/agents", headers={"Authorization": f"Bearer {token}"})
        ).status_code == 200
        cookie = {"Cookie": f"chorus_token={token}"}
        assert (await client.get("/v1/agents", headers=cookie)).status_code == 200


async def chat_events(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    with anyio.fail_after(60):
        async with client.stream("POST", "/v1/chat", json=body) as response:
            assert response.status_code == 200, await response.aread()
            events = [event async for event in sse_events(response)]
            return response.headers["x-chorus-conversation"], events


async def test_a_stream_carries_only_its_own_turn_and_ids_cannot_be_replayed(
    served: Served,
) -> None:
    """Two conversations at once: each response carries its own conversation and turn
    only. A conversation id nobody has seen is refused, so ids cannot be guessed into;
    the next turn on a known one carries new streams, never the earlier turn's again."""
    async with served.gateway.client() as client:
        unseen = await client.post("/v1/chat", json={"text": "hi", "conversation": "c-guessed"})
        assert unseen.status_code == 404
        results: dict[str, tuple[str, list[tuple[str, dict[str, Any]]]]] = {}

        async def one(label: str) -> None:
            results[label] = await chat_events(client, {"text": f"turn {label}"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "a")
            tg.start_soon(one, "b")
        (conv_a, events_a), (conv_b, events_b) = results["a"], results["b"]
        assert conv_a != conv_b
        streams: dict[str, set[str]] = {}
        for conversation, events in ((conv_a, events_a), (conv_b, events_b)):
            assert events and events[-1][0] == "final" and events[-1][1]["closes_turn"]
            assert {data["conversation"] for _, data in events} == {conversation}
            streams[conversation] = {data["stream"] for _, data in events}
        assert not streams[conv_a] & streams[conv_b]
        again, events = await chat_events(client, {"text": "turn a2", "conversation": conv_a})
        assert again == conv_a
        assert {data["conversation"] for _, data in events} == {conv_a}
        assert not {data["stream"] for _, data in events} & streams[conv_a]


async def test_requests_over_the_limits_are_4xx(served: Served) -> None:
    """Bodies over 64 KiB, announced or chunked, are covered by
    tests/gateway/test_gateway_api.py::test_a_body_over_the_limit_is_413_whether_announced_or_chunked;
    here: a Content-Length that lies or is not a number, long URLs and headers, JSON
    nested too deep to parse."""
    gateway = served.gateway
    for length in (b"10000000", b"12abc"):  # a raw request: HTTP clients will not lie
        status = await raw_status(
            gateway.url,
            b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {gateway.token}\r\n".encode()
            + b"Content-Length: "
            + length
            + b'\r\n\r\n{"text": "hi"}',
        )
        assert status is not None and 400 <= status < 500, (length, status)
    async with gateway.client() as client:
        auth = f"Authorization: Bearer {gateway.token}\r\n".encode()
        pad = b"x" * 100_000
        for request in (  # a long URL or header that arrives whole is read, and answered
            b"GET /v1/logs?text=" + pad + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
            b"GET /v1/agents HTTP/1.1\r\nHost: x\r\nX-Pad: " + pad + b"\r\n" + auth + b"\r\n",
        ):
            status = await raw_status(gateway.url, request)
            assert status is not None and status < 500
        # headers that keep coming stop at h11's 16 KiB for an incomplete request
        flood = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 1000) for i in range(10_000))
        request = b"GET /v1/agents HTTP/1.1\r\nHost: x\r\n" + flood + auth + b"\r\n"
        assert await raw_status(gateway.url, request) in (400, None)
        deep = b"[" * 30_000 + b"]" * 30_000
        for content in (deep, b'{"text": ' + deep[:20_000] + deep[-20_000:] + b"}"):
            response = await client.post(
                "/v1/chat", content=content, headers={"Content-Type": "application/json"}
            )
            assert response.status_code in (400, 422), response.text
            assert isinstance(response.json()["error"], str)


async def raw_status(url: str, request: bytes) -> int | None:
    """The status a raw HTTP/1.1 request gets; None if the server cut the connection
    (a reset can overtake the error it sent)."""
    host, port = url.removeprefix("http://").split(":")
    head = b""
    with anyio.fail_after(30):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            try:
                await stream.send(request)
            except (anyio.BrokenResourceError, ConnectionError):
                pass  # the server answered and closed before taking it all
            try:
                while b"\r\n" not in head:
                    head += await stream.receive()
            except (anyio.BrokenResourceError, anyio.EndOfStream, ConnectionError):
                return None
    return int(head.split()[1])


async def streams_open(client: httpx.AsyncClient) -> int:
    metrics = (await client.get("/metrics")).text
    line = next(x for x in metrics.splitlines() if x.startswith("chorus_gateway_streams_open"))
    return int(float(line.split()[-1]))


async def test_a_flood_of_event_streams_stops_at_the_per_token_limit_with_429(
    served: Served,
) -> None:
    async with served.gateway.client() as client:
        with anyio.fail_after(30):
            while await streams_open(client):  # noqa: ASYNC110 (earlier tests' streams end)
                await anyio.sleep(0.1)
        async with AsyncExitStack() as flood:
            for _ in range(STREAMS_PER_TOKEN):
                response = await flood.enter_async_context(client.stream("GET", "/v1/events"))
                assert response.status_code == 200
            assert await streams_open(client) == STREAMS_PER_TOKEN
            for method, path, body in (
                ("GET", "/v1/events", None),
                ("POST", "/v1/chat", {"text": "one more"}),
            ):
                refused = await client.request(method, path, json=body)
                assert refused.status_code == 429, refused.text
                assert "too many open streams" in refused.json()["error"]
                assert int(refused.headers["retry-after"]) >= 1
            # the rest of the API still answers, and so does the health check
            assert (await client.get("/v1/agents")).status_code == 200
            assert (await client.get("/healthz")).json()["bus"] is True
        with anyio.fail_after(30):  # the gateway notices each disconnect and frees its slot
            while await status_of(client, "GET", "/v1/events") != 200:  # noqa: ASYNC110
                await anyio.sleep(0.1)


PATHS = [*(path for _, path in TOKEN_ROUTES), "/", "/login", "/healthz", "/docs", "/openapi.json"]
QUERY_KEYS = ["since", "until", "limit", "order", "state", "topic", "sender", "prefix"]
QUERY_KEYS += ["conversation", "task", "text", "token", ""]
path_segments = st.text(alphabet=string.printable + "é東\x00", max_size=12).map(quote)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)  # what JSON can carry
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=12,
)
chat_like = st.fixed_dictionaries(
    {},
    optional={
        "text": json_values,
        "conversation": st.text(max_size=140) | json_values,
    },
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    path = draw(st.sampled_from(PATHS))
    if draw(st.booleans()):
        path = draw(st.sampled_from([path, "/v1", "/assets", ""])) + "/" + draw(path_segments)
    params = draw(
        st.lists(st.tuples(st.sampled_from(QUERY_KEYS), st.text(max_size=30)), max_size=4)
    )
    body = draw(
        st.one_of(
            st.none(),
            st.binary(max_size=200),
            chat_like.map(lambda d: httpx.Request("POST", "/", json=d).content),
            json_values.map(lambda v: httpx.Request("POST", "/", json=v).content),
        )
    )
    content_type = draw(
        st.sampled_from(["application/json", "text/plain", "multipart/form-data", "", 'x/y; q=""'])
    )
    headers = {"Content-Type": content_type} if content_type else {}
    if draw(st.integers(0, 9)) == 0:
        headers["Authorization"] = draw(st.sampled_from(["Bearer x", "", "Bearer", "Basic Og=="]))
    return {"method": method, "url": path, "params": params, "content": body, "headers": headers}


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    """One client for every example (a new connection each time would be most of the cost)."""
    headers = {"Authorization": f"Bearer {served.gateway.token}"}
    with httpx.Client(base_url=served.gateway.url, headers=headers, timeout=30) as client:
        yield client


@settings(max_examples=200, deadline=None, database=None)
@given(request=requests())
def test_garbage_at_every_route_is_answered_4xx_never_5xx(
    served: Served, http: httpx.Client, request: dict[str, Any]
) -> None:
    with http.stream(**request) as response:  # a 200 may be an endless stream: not read
        status = response.status_code
        if 400 <= status < 500 and request["method"] != "HEAD":
            response.read()
            if response.headers.get("content-type", "").startswith("application/json"):
                assert isinstance(response.json()["error"], str)
    assert status < 500, (status, request)
    assert served.gateway.proc.poll() is None
