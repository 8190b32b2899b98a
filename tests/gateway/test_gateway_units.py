"""The gateway's parts that need no server: the token file, the rate limit, the feed's
prefixes, the models against the Structs they mirror, the docs against the routes, and
the tail of an answer read from the held streams."""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from orchestrator.task_graph import TaskNode
from runtime import messages as m
from runtime.errors import ConfigError
from runtime.gateway import GatewayConfig, create_app, load_or_create_token
from runtime.gateway import models as api
from runtime.gateway.app import is_loopback
from runtime.gateway.auth import RateLimiter, parse_rate, token_matches
from runtime.gateway.feeds import feed_prefixes, follow_tail
from runtime.gateway.tails import Tails
from runtime.paths import DataDir

DOCS = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"


def test_the_token_is_made_once_private_and_kept(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    token = load_or_create_token(keys)
    assert len(token) >= 43  # 32 random bytes, url-safe base64
    path = keys / "gateway.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(keys) == token
    path.chmod(0o644)  # a careless copy: the mode is put back
    assert load_or_create_token(keys) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in keys.iterdir()] == ["gateway.token"]  # no temp file left
    assert token_matches(token, token) and not token_matches(token + "x", token)
    assert not token_matches(None, token)


def test_rates_read_like_people_write_them() -> None:
    assert parse_rate("60/min") == 60
    assert parse_rate("2/s") == 120
    assert parse_rate("600/hour") == 10
    assert parse_rate("30") == 30
    assert parse_rate("0") == 0
    with pytest.raises(ConfigError, match="60/min"):
        parse_rate("lots")


def test_the_rate_limit_allows_a_burst_then_refills_per_token() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=2, clock=lambda: now[0])
    assert limiter.wait_s("a") == 0 and limiter.wait_s("a") == 0
    assert limiter.wait_s("a") == pytest.approx(30.0)
    assert limiter.wait_s("b") == 0  # each token has its own bucket
    now[0] += 30
    assert limiter.wait_s("a") == 0
    assert RateLimiter(per_minute=0).wait_s("a") == 0  # off


def test_feed_prefixes_drop_what_another_prefix_covers() -> None:
    assert feed_prefixes([]) == ("",)
    assert feed_prefixes(["task.", "task.update", "sys."]) == ("sys.", "task.")
    assert feed_prefixes(["heartbeat.rag", "heartbeat.rag"]) == ("heartbeat.rag",)


def test_loopback_hosts_are_told_apart() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")


def test_the_json_models_mirror_the_structs() -> None:
    assert set(api.TaskNodeOut.model_fields) == set(TaskNode.__struct_fields__)
    assert set(api.EnvelopeOut.model_fields) == set(m.Envelope.__struct_fields__)
    node = TaskNode(id="t1", kind="search", created=1.0, updated=2.0)
    assert api.TaskNodeOut.model_validate_json(msgspec.json.encode(node)).id == "t1"


def _documented_routes() -> set[tuple[str, str]]:
    heading = re.compile(r"^#{2,4} `(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`", re.MULTILINE)
    return {(method, path) for method, path in heading.findall(DOCS.read_text())}


def test_every_route_in_the_openapi_schema_is_documented_and_no_other(tmp_path: Path) -> None:
    app = create_app(GatewayConfig(data=DataDir(tmp_path / "data"), token="t"))
    schema = app.openapi()
    routes = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    assert routes == _documented_routes()
    text = DOCS.read_text()
    for model in api.SSE_MODELS:  # the event data the stream routes send
        assert model.__name__ in text, model.__name__


def test_restarts_and_heartbeats_from_before_the_gateway_came_are_read_from_the_log(
    tmp_path: Path,
) -> None:
    from orchestrator.log.layout import hour_file_name
    from runtime.gateway.feeds import Observer

    now = 1_736_935_200.0 + 1800  # the middle of an hour
    envelopes = [
        m.Envelope(id="r1", topic="sys.restart", sender="supervisor", ts=now - 600, seq=1,
                   body=m.ProcessEvent(process="rag", restarts=1)),
        m.Envelope(id="r0", topic="sys.restart", sender="supervisor", ts=now - 1200, seq=2,
                   body=m.ProcessEvent(process="rag", restarts=1)),  # before this instance
        m.Envelope(id="h1", topic="heartbeat.rag", sender="rag", ts=now - 1, seq=3,
                   body=m.Heartbeat(state="busy", task="t1")),
    ]  # fmt: skip
    (tmp_path / hour_file_name(now)).write_bytes(
        b"".join(msgspec.json.encode(e) + b"\n" for e in envelopes)
    )
    observer = Observer()
    observer.seed_from_log(tmp_path, since=now - 900, now=now)
    [rag] = observer.agent_list(now=now)
    assert (rag.name, rag.state, rag.task, rag.restarts) == ("rag", "busy", "t1", 1)
    assert not observer.messages  # history is state, not traffic the gateway saw


def test_held_streams_stay_within_their_bounds() -> None:
    from runtime.gateway.tails import STREAMS_PER_CONVERSATION, Tails

    tails = Tails(max_chunks=10)
    for seq in (0, 1, 1, 0):  # a chunk said again counts once
        tails.add("c1", m.Chunk(stream="s", seq=seq, delta="x", turn="t"))
    held = tails.get("c1")
    assert held is not None and [c.seq for c in held.streams[0].chunks] == [0, 1]
    for i in range(STREAMS_PER_CONVERSATION + 2):  # a conversation keeps its latest streams
        tails.add("c2", m.Chunk(stream=f"s{i}", seq=0, delta="x"))
    streams = tails.get("c2").streams  # type: ignore[union-attr]
    assert streams[0].stream == "s2" and len(streams) == STREAMS_PER_CONVERSATION
    assert streams[0].turn == "s2"  # a stream that answers no turn is its own
    assert tails.held == 2 + STREAMS_PER_CONVERSATION
    tails.add("c3", m.Chunk(stream="s", seq=0, delta="x"))  # past 10: the least recent goes
    assert tails.get("c1") is None and tails.get("c2") is not None
    assert tails.held == STREAMS_PER_CONVERSATION + 1


def test_a_gateway_that_connects_holds_the_logs_recent_streams_again(tmp_path: Path) -> None:
    from orchestrator.log.layout import hour_file_name
    from orchestrator.log.writer import redact_text
    from runtime.gateway.feeds import TAIL_SEED_S, Observer, recent_chunks

    now = 1_736_935_200.0 + 1800

    def said(i: int, stream: str, seq: int, delta: str, ago: float, **end: object) -> m.Envelope:
        chunk = m.Chunk(stream=stream, seq=seq, delta=delta, turn="t1", **end)  # type: ignore[arg-type]
        return m.Envelope(id=f"e{i}", topic="user.out", sender="narrator", ts=now - ago, seq=i,
                          body=chunk, conversation="c1")  # fmt: skip

    envelopes = [
        said(0, "old", 0, "long ago", TAIL_SEED_S + 60),
        said(1, "a1", 0, "Hello", 30),
        said(2, "a1", 1, "", 29, final=True, finish="done", closes_turn=True),
        said(3, "r1", 0, redact_text("secret"), 20),  # a --log-redact log: no text to give
        said(4, "r1", 1, redact_text(""), 19, final=True, finish="done", closes_turn=True),
    ]
    (tmp_path / hour_file_name(now)).write_bytes(
        b"".join(msgspec.json.encode(e) + b"\n" for e in envelopes)
    )
    chunks = recent_chunks(tmp_path, now=now)
    assert [e.id for e in chunks] == ["e1", "e2"]
    observer = Observer()
    for envelope in chunks:
        observer.see(envelope, live=False)
    held = observer.tails.get("c1")
    assert held is not None and [s.stream for s in held.streams] == ["a1"]
    assert [c.delta for c in held.streams[0].chunks] == ["Hello", ""]
    assert "c1" in observer.conversations


def test_a_late_chunk_fills_its_gap_and_a_copy_is_held_once() -> None:
    from runtime.gateway.tails import Tails

    tails = Tails()
    for seq in (0, 1, 3, 4, 2, 3, 0):  # 2 late; 3 and 0 said again after a broker restart
        tails.add("c1", m.Chunk(stream="s", seq=seq, delta=str(seq), turn="t"))
    held = tails.get("c1")
    assert held is not None and [c.seq for c in held.streams[0].chunks] == [0, 1, 2, 3, 4]
    assert tails.held == 5


async def _tail_of(tails: Tails, feed: Callable[[], Awaitable[None]], **wait: float) -> list[str]:
    """What ``follow_tail`` emits for conversation c1's latest turn while ``feed`` adds
    chunks: each event's name, and a chunk's delta after a colon."""
    held = tails.get("c1")
    assert held is not None
    events: list[str] = []

    async def emit(event: bytes) -> None:
        name, data = event.decode().split("\n")[:2]
        body = json.loads(data.removeprefix("data: "))
        events.append(
            name.removeprefix("event: ") + (f":{body['delta']}" if "delta" in body else "")
        )

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(follow_tail, held, "c1", None, -1, emit, timeout_s=5, **wait))
            await feed()
    return events


def _say(tails: Tails, seq: int, stream: str = "s", **end: Any) -> None:
    tails.add("c1", m.Chunk(stream=stream, seq=seq, delta=f"<{seq}>", turn="t", **end))


CLOSE = {"final": True, "finish": "done", "closes_turn": True}


async def test_the_tail_holds_a_chunk_after_a_gap_until_the_late_one_fills_it() -> None:
    tails = Tails()
    _say(tails, 0)

    async def feed() -> None:
        await anyio.sleep(0.05)
        _say(tails, 2)
        await anyio.sleep(0.1)  # the reader sees 2 with 1 missing: it waits
        _say(tails, 1)  # late, as after a broker restart
        _say(tails, 3, **CLOSE)

    events = await _tail_of(tails, feed)
    assert events == ["chunk:<0>", "chunk:<1>", "chunk:<2>", "chunk:<3>", "final"]


async def test_the_tail_goes_on_without_a_chunk_that_never_comes() -> None:
    tails = Tails()
    _say(tails, 0)

    async def feed() -> None:
        _say(tails, 2, **CLOSE)  # 1 is lost for good

    events = await _tail_of(tails, feed, gap_wait_s=0.3)
    assert events == ["chunk:<0>", "chunk:<2>", "final"]


async def test_the_tail_reads_what_came_while_it_was_emitting() -> None:
    tails = Tails()
    _say(tails, 0)
    held = tails.get("c1")
    assert held is not None
    events: list[str] = []

    async def emit(event: bytes) -> None:
        events.append(event.decode().split("\n")[0])
        if len(events) == 1:  # the answer's stream starts, and ends, during this emit
            _say(tails, 0, stream="answer", **CLOSE)
        await anyio.lowlevel.checkpoint()

    with anyio.fail_after(3):  # before, the reader waited for a next chunk that never came
        await follow_tail(held, "c1", None, -1, emit, timeout_s=30)
    assert events == ["event: chunk", "event: chunk", "event: final"]
