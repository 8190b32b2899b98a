"""The engine process's loop on a tiny random model: sessions, streaming, fairness,
batching, cancellation, eviction and bad requests, through the real socket and client."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio
import msgspec
import pytest
import zmq
import zmq.asyncio
from transformers import PreTrainedTokenizerFast

from engine.client import Client, EngineError, EngineUnavailable, SessionLost
from engine.protocol import Message
from engine.sampling import SamplingParams
from engine.server import EngineConfig, EngineServer
from runtime.keys import load_public
from runtime.paths import DataDir
from tests.engine.conftest import serving_tiny

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture
def engine(data: DataDir, tiny_tokenizer: PreTrainedTokenizerFast) -> Iterator[EngineServer]:
    config = EngineConfig(sink=2, window=30, idle_s=60, max_append_tokens=400)
    with serving_tiny(data, tiny_tokenizer, config) as server:
        yield server


def client(data: DataDir, identity: str = "narrator", timeout: float = 10) -> Client:
    return Client.connect(identity, data.root, timeout=timeout)


async def test_a_session_grows_turn_by_turn_without_resending(
    data: DataDir, engine: EngineServer
) -> None:
    async with client(data) as llm:
        await llm.open("c1", system_prompt="Be brief.")
        first = await llm.append(
            "c1", messages=[Message(role="user", content="yes no")], generation_prompt=True
        )
        chunks = [c async for c in llm.generate("c1", GREEDY)]
        assert chunks[-1].finish in ("stop", "length")
        assert [c.tokens for c in chunks] == list(range(1, len(chunks) + 1))  # one chunk per token
        turn = engine.templates.messages(
            [Message(role="user", content="the end")], True, first=False
        )
        second = await llm.append(
            "c1", messages=[Message(role="user", content="the end")], generation_prompt=True
        )
        # only the reply, the template's tail after it, and the new turn were added
        reply = len(chunks) - (chunks[-1].finish == "stop")
        assert second == first + reply + len(engine.templates.reply_tail) + len(turn)


async def test_concurrent_generations_interleave_and_share_forward_calls(
    data: DataDir, engine: EngineServer
) -> None:
    params = SamplingParams(temperature=0, max_tokens=40)
    async with client(data) as llm:
        for name in ("a", "b", "c"):
            await llm.open(name)
            await llm.append(name, text="The quick brown fox")
        counts: dict[str, list[int]] = {"a": [], "b": [], "c": []}
        before = engine.forward_calls
        engine.decode_batches.clear()

        async def run(name: str) -> None:
            async for chunk in llm.generate(name, params):
                counts[name].append(chunk.tokens)

        async with anyio.create_task_group() as tg:
            for name in ("a", "b", "c"):
                tg.start_soon(run, name)
    total = sum(len(seen) for seen in counts.values())
    calls = engine.forward_calls - before
    assert calls < total, f"{calls} forward calls for {total} tokens: no batching"
    # every stream got every token, in order, one chunk per token
    assert all(seen == list(range(1, 41)) for seen in counts.values()), counts
    # the engine advanced all three in one forward call per step while all three ran
    # (which step they joined on depends on when each request arrived, so count, not index)
    batches = list(engine.decode_batches)
    assert batches.count(3) >= 20, batches
    assert max(batches) == 3, batches


async def test_background_work_waits_while_a_foreground_request_runs(
    data: DataDir, engine: EngineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A summary (background) started first does not slow an answer (foreground): the
    answer's tokens are decoded alone, and the summary finishes after it (its share
    under long foreground work is switched off here)."""
    monkeypatch.setattr("engine.server.BACKGROUND_EVERY_S", 100)
    params = SamplingParams(temperature=0, max_tokens=30)
    async with client(data) as llm:
        await llm.open("chat")
        await llm.append("chat", text="The quick brown fox")
        done: list[str] = []

        async def summary() -> None:
            long = SamplingParams(temperature=0, max_tokens=200)
            await llm.complete_text("summarise " * 30, long, background=True)
            done.append("summary")

        async def answer() -> None:
            async for _ in llm.generate("chat", params):
                pass
            done.append("answer")

        engine.decode_batches.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(summary)
            await anyio.sleep(0.01)  # the summary is under way
            tg.start_soon(answer)
    assert done == ["answer", "summary"]
    batches = list(engine.decode_batches)
    assert max(batches) == 1, batches  # never decoded side by side: the summary waited


async def test_a_generation_held_back_longer_than_the_client_timeout_is_kept_alive(
    data: DataDir, engine: EngineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A summary held back by foreground work for longer than the client waits for a
    chunk is not given up on: the engine sends empty chunks while it waits."""
    monkeypatch.setattr("engine.server.KEEPALIVE_S", 0.2)
    monkeypatch.setattr("engine.server.BACKGROUND_EVERY_S", 100)  # held back all along
    params = SamplingParams(temperature=0, max_tokens=50)
    async with client(data, timeout=1.0) as llm:
        await llm.open("chat")
        await llm.append("chat", text="The quick brown fox")
        chunks = []

        async def summary() -> None:
            short = SamplingParams(temperature=0, max_tokens=5)
            async for chunk in llm.complete("summarise " * 10, short, background=True):
                chunks.append(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_back_to_back, llm, params, 3)
            await anyio.sleep(0.1)  # the answers are under way
            tg.start_soon(summary)
    assert chunks[-1].finish, chunks
    waits = [c for c in chunks if not c.delta and not c.finish and c.tokens == 0]
    assert len(waits) >= 3, chunks  # ~3 s held back, an empty chunk every 0.2 s


async def test_background_work_gets_its_share_under_steady_foreground_work(
    data: DataDir, engine: EngineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under foreground work with no pause, a summary still advances (a step every
    ``BACKGROUND_EVERY_S``) and finishes while the work goes on; and past
    ``MAX_BACKGROUND_JOBS`` waiting, another background request is refused as busy
    rather than held (each holds a cache)."""
    monkeypatch.setattr("engine.server.BACKGROUND_EVERY_S", 0.02)
    monkeypatch.setattr("engine.server.MAX_BACKGROUND_JOBS", 1)
    params = SamplingParams(temperature=0, max_tokens=50)
    async with client(data) as llm:
        await llm.open("chat")
        await llm.append("chat", text="The quick brown fox")
        finished: list[str] = []
        refused: list[str] = []

        async def summary() -> None:
            short = SamplingParams(temperature=0, max_tokens=5)
            await llm.complete_text("summarise " * 10, short, background=True)
            finished.append("summary")

        async def another() -> None:
            try:
                await llm.complete_text("and this", GREEDY, background=True)
            except EngineError as exc:
                refused.append(exc.kind)

        async def answers() -> None:  # until the summary is in
            await answer_back_to_back(llm, params, 10, until=lambda: bool(finished))
            finished.append("answers")

        async with anyio.create_task_group() as tg:
            tg.start_soon(answers)
            await anyio.sleep(0.1)  # the answers are under way
            tg.start_soon(summary)
            await queued_at_least_background(engine, 1)
            tg.start_soon(another)
    assert finished == ["summary", "answers"]  # done while the foreground work went on
    assert refused == ["busy"]


async def answer_back_to_back(
    llm: Client, params: SamplingParams, seconds: float, until: Callable[[], bool] = lambda: False
) -> None:
    """Foreground work with no pause: answers on session "chat", one after another, for
    ``seconds`` or until ``until()``."""
    with anyio.move_on_after(seconds):
        while not until():
            async for _ in llm.generate("chat", params):
                pass
            await llm.append("chat", text=" and")


async def queued_at_least_background(engine: EngineServer, jobs: int) -> None:
    with anyio.fail_after(10):
        while engine._background_jobs() < jobs:  # noqa: ASYNC110
            await anyio.sleep(0.001)


async def queued_at_least(engine: EngineServer, jobs: int) -> None:
    with anyio.fail_after(10):
        for _ in iter(int, 1):  # until the engine holds that many prompts
            if len(engine.prefills) >= jobs:
                return
            await anyio.sleep(0.001)


async def test_one_sessions_backlog_of_prompts_does_not_hold_up_another_session(
    data: DataDir, engine: EngineServer
) -> None:
    """A client floods one session with appends (a user typing faster than the narrator
    speaks, every turn queued); another session's append, sent after them, is served
    within a few turns, not after the whole backlog (sessions take turns at prefill)."""
    async with client(data) as llm, client(data, "controller") as other:
        await llm.open("flood")
        await other.open("calm")
        order: list[str] = []

        async def flood(i: int) -> None:
            await llm.append("flood", text="The quick brown fox jumps over the lazy dog. " * 6)
            order.append(f"flood-{i}")

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(flood, i)
            await queued_at_least(engine, 20)  # the backlog is in the engine
            await other.append("calm", text="Paris is")
            order.append("calm")
    assert len(order) == 41
    assert order.index("calm") < 10, order  # FIFO would serve it after every flood append


async def test_reopening_a_session_drops_its_queued_prompts(
    data: DataDir, engine: EngineServer
) -> None:
    """Open on a session that still has prompts queued (a narrator cut off mid-append
    opens it again) cancels them: its cache is recycled, and they must not land in it."""
    async with client(data) as llm:
        await llm.open("fresh")
        expected = await llm.append("fresh", text="Paris is")
        await llm.open("s")
        failed: list[str] = []

        async def queued() -> None:
            try:
                await llm.append("s", text="The quick brown fox jumps over the lazy dog. " * 6)
            except EngineError as exc:
                failed.append(str(exc))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(queued)
            await queued_at_least(engine, 10)
            await llm.open("s")  # reset while they wait
            assert await llm.append("s", text="Paris is") == expected
    assert failed and all("cancelled" in reason for reason in failed), failed

    async with client(data) as llm:
        await llm.open("long")
        await llm.append("long", text="The quick brown fox")
        seen = 0
        async for _ in llm.generate(
            "long", SamplingParams(temperature=0.8, seed=1, max_tokens=4000)
        ):
            seen += 1
            if seen == 3:
                break  # leaving the loop sends Cancel
        await anyio.sleep(0.3)
        stats = await llm.stats()
        assert stats.active_requests == 0
        # the session is usable again at once
        await llm.append("long", text=" jumps")
        assert [c async for c in llm.generate("long", SamplingParams(temperature=0, max_tokens=2))]


async def test_explicit_cancel_ends_the_stream_with_cancelled(
    data: DataDir, engine: EngineServer
) -> None:
    async with client(data) as llm:
        await llm.open("s")
        await llm.append("s", text="Paris is")
        stream = llm.generate("s", SamplingParams(temperature=0.8, seed=2, max_tokens=4000))
        first = await anext(stream)
        request = next(iter(llm._waiting))
        await llm.cancel(request)
        rest = [c async for c in stream]
        assert rest and rest[-1].finish == "cancelled"
        assert first.tokens + len(rest) < 20  # stopped within a step or two, not at max_tokens


async def test_idle_session_is_evicted_and_can_be_reopened(
    data: DataDir, engine: EngineServer
) -> None:
    engine.config.idle_s = 0.2
    async with client(data) as llm:
        await llm.open("idle")
        await llm.append("idle", text="hello")
        await anyio.sleep(0.6)
        with pytest.raises(SessionLost, match="open it again"):
            await llm.append("idle", text="again")
        await llm.open("idle")
        assert await llm.append("idle", text="again") > 0


async def test_bad_requests_get_errors_and_the_engine_keeps_serving(
    data: DataDir, engine: EngineServer
) -> None:
    async with client(data) as llm:
        with pytest.raises(EngineError, match="open it first") as unknown:
            await llm.append("nope", text="x")
        assert unknown.value.kind == "unknown_session"
        await llm.open("s")
        with pytest.raises(EngineError) as too_long:
            await llm.append("s", text="yes no " * 400)
        assert too_long.value.kind == "too_long"
        with pytest.raises(EngineError, match="empty"):
            [c async for c in llm.generate("s", GREEDY)]
        # raw garbage and a negative max_tokens, straight onto the socket
        assert llm._sock is not None
        await llm._sock.send(b"\xc1 not msgpack")
        bad = msgspec.msgpack.encode(
            {"type": "Generate", "id": "neg", "session": "s", "params": {"max_tokens": -1}}
        )
        await llm._sock.send(bad)
        await anyio.sleep(0.2)
        assert (await llm.stats()).model == "tiny"
        broken = SamplingParams(json_schema={"type": "no-such-type"})
        with pytest.raises(EngineError, match="json_schema is not usable") as schema:
            await llm.complete_text(prompt="hi", params=broken)
        assert schema.value.kind == "bad_request"
        assert (await llm.stats()).sessions == 1  # the refused complete left no session behind


async def test_complete_keeps_no_session(data: DataDir, engine: EngineServer) -> None:
    async with client(data, "controller") as llm:
        text = await llm.complete_text(
            messages=[Message(role="user", content="yes or no?")],
            params=SamplingParams(temperature=0, choices=["yes", "no"]),
        )
        assert text in ("yes", "no")
        assert (await llm.stats()).sessions == 0


async def test_sessions_are_private_to_their_caller(data: DataDir, engine: EngineServer) -> None:
    async with client(data, "narrator") as narrator, client(data, "coder") as coder:
        await narrator.open("shared-name")
        with pytest.raises(EngineError, match="open it first"):
            await coder.append("shared-name", text="x")


@pytest.mark.parametrize("identity", ["client", "monitor"])
async def test_client_and_monitor_are_refused(
    data: DataDir, engine: EngineServer, identity: str
) -> None:
    async with client(data, identity, timeout=1.0) as llm:
        with pytest.raises(EngineUnavailable):
            await llm.stats()


async def test_a_stranger_key_is_refused(data: DataDir, engine: EngineServer) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    public, secret = zmq.curve_keypair()
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = load_public(data.keys, "engine")
    sock.connect(data.ipc("engine"))
    try:
        await sock.send(msgspec.msgpack.encode({"type": "Stats", "id": "x"}))
        with anyio.move_on_after(1.0) as scope:
            await sock.recv()
        assert scope.cancelled_caught
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_requests_in_flight_fail_at_once_when_the_engine_goes_away(
    data: DataDir, engine: EngineServer
) -> None:
    """The engine stops mid-stream: the stream ends with EngineUnavailable as soon as the
    connection drops, long before the reply timeout (60 s here)."""
    async with client(data, timeout=60) as llm:
        await llm.open("s")
        await llm.append("s", text="The quick brown fox")
        started = anyio.current_time()
        with pytest.raises(EngineUnavailable, match="dropped"):
            async for _ in llm.generate("s", SamplingParams(temperature=0, max_tokens=4000)):
                if engine.forward_calls > 5:
                    await anyio.to_thread.run_sync(engine.stop)
        assert anyio.current_time() - started < 30
        assert llm.disconnects == 1
