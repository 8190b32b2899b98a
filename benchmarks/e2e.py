"""End to end: how fast the user hears something, how fast an interruption lands, and
what the bus costs the narrator's stream.

    .venv/bin/python -m benchmarks.e2e            # 20 turns (about 5 minutes here)
    .venv/bin/python -m benchmarks.e2e --quick    # 5 turns

Starts the whole system (``runtime.Runtime``: broker, engine with the default model,
controller, narrator; no worker agents, so every turn is answered by the narrator),
sends one warm-up turn that is not counted, and measures, as a client on the bus sees
it:

* ``first_chunk_*``: from publishing ``user.in`` (small talk) to the first
  model-generated ``user.out`` chunk (the narrator sends no templated text for small
  talk, so every chunk counts);
* ``interrupt_*``: from a preempting ``user.in`` to the ``interrupted`` final chunk of
  the stream it cut;
* ``bus_overhead_pct``: the narrator's tokens/s as the client receives them, against
  the engine's raw tokens/s for the same request (the narrator's system prompt, the
  user's text, its sampling) straight over ``engine.Client``, made right after each
  turn so both see the same load (tokens counted with the model's tokenizer).

Targets on this CPU machine (issue): first chunk p50 ≤ 1.5 s, interruption p50 ≤ 0.25 s,
bus overhead ≤ 5%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio

from benchmarks._common import percentile, save_plot, write_json
from engine.client import Client
from engine.protocol import Message
from orchestrator import prompts
from orchestrator.narrator import SPEAK
from runtime import messages as m
from runtime.bus import Subscription
from runtime.embed import Runtime

SMALL_TALK = ["hello!", "hi there", "thanks!", "good morning!", "how are you?"]
LONG = "Tell me a long story about a lighthouse keeper and a storm."


async def first_chunk(
    rt: Runtime, out: Subscription, text: str, conversation: str
) -> tuple[float, str, float]:
    """Seconds to the first chunk with text; the whole text; seconds first→final."""
    started = time.perf_counter()
    await rt.publish("user.in", m.UserTurn(text=text), conversation=conversation)
    first = 0.0
    parts: list[str] = []
    with anyio.fail_after(60):
        async for env in out:
            body = env.body
            if env.conversation != conversation or not isinstance(body, m.Chunk):
                continue
            if body.delta and not first:
                first = time.perf_counter() - started
            parts.append(body.delta)
            if body.final:
                return first, "".join(parts), time.perf_counter() - started - first
    raise AssertionError("no answer")


async def interrupt(rt: Runtime, out: Subscription, conversation: str) -> float:
    """Seconds from a preempting turn to the interrupted chunk of the stream it cut."""
    await rt.publish("user.in", m.UserTurn(text=LONG), conversation=conversation)
    stream = ""
    with anyio.fail_after(180):
        async for env in out:
            body = env.body
            if env.conversation == conversation and isinstance(body, m.Chunk) and body.delta:
                stream = body.stream
                break
        await anyio.sleep(0.5)  # let it speak a little
        started = time.perf_counter()
        await rt.publish("user.in", m.UserTurn(text="stop, thanks!"), conversation=conversation)
        async for env in out:
            body = env.body
            if isinstance(body, m.Chunk) and body.stream == stream and body.final:
                assert body.finish == "interrupted", body.finish
                elapsed = time.perf_counter() - started
                break
        async for env in out:  # let the answer to "stop" finish before the next round
            body = env.body
            if (
                env.conversation == conversation
                and isinstance(body, m.Chunk)
                and body.final
                and body.stream != stream
            ):
                break
    return elapsed


async def engine_raw(llm: Client, text: str, session: str) -> tuple[str, float]:
    """The engine alone, for the request the narrator makes for ``text`` (its system
    prompt, the user's text, its sampling): the text, and seconds from the first chunk
    with text to the last chunk."""
    await llm.open(session, system_prompt=prompts.render("narrator", summary="").strip())
    await llm.append(session, messages=[Message(role="user", content=text)], generation_prompt=True)
    first = last = 0.0
    parts = []
    async for chunk in llm.generate(session, SPEAK):
        now = time.perf_counter()
        if chunk.delta:
            first = first or now
        last = now
        parts.append(chunk.delta)
    await llm.close(session)
    return "".join(parts), last - first


async def run(turns: int, data_dir: Path) -> dict[str, Any]:
    from engine.weights import converted_dir, default_model_path, load_tokenizer

    # loaded before the runtime starts: its supervisor shares this event loop
    tokenizer = load_tokenizer(converted_dir(default_model_path()))
    async with Runtime(data_dir, agents={}) as rt, AsyncExitStack() as stack:

        def tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False).input_ids)

        out = rt.subscribe("user.out")
        llm = await stack.enter_async_context(Client.connect("operator", rt.data.root, timeout=120))
        # one turn not counted: the first forward passes pay for allocation and caches
        await first_chunk(rt, out, SMALL_TALK[0], "warm-up")
        firsts, bus_rates, raw_rates = [], [], []
        for i in range(turns):
            said = SMALL_TALK[i % len(SMALL_TALK)]
            first, text, stream_s = await first_chunk(rt, out, said, f"turn-{i}")
            firsts.append(first)
            if stream_s > 0 and tokens(text) > 4:
                bus_rates.append((tokens(text) - 1) / stream_s)
            # the same request straight to the engine, right after: the same load on the box
            raw, raw_s = await engine_raw(llm, said, f"raw-{i}")
            if raw_s > 0 and tokens(raw) > 4:
                raw_rates.append((tokens(raw) - 1) / raw_s)
            print(f"turn {i}: first chunk {first:.3f} s, {tokens(text)} tokens: {text[:60]!r}")
        interrupts = []
        for i in range(max(3, turns // 4)):
            seconds = await interrupt(rt, out, f"interrupt-{i}")
            interrupts.append(seconds)
            print(f"interrupt {i}: {seconds * 1000:.0f} ms")
    bus_tok_s = statistics.median(bus_rates) if bus_rates else float("nan")
    engine_tok_s = statistics.median(raw_rates) if raw_rates else float("nan")
    return {
        "turns": turns,
        "first_chunk_p50_s": round(percentile(firsts, 50), 3),
        "first_chunk_p95_s": round(percentile(firsts, 95), 3),
        "interrupt_p50_s": round(percentile(interrupts, 50), 3),
        "interrupt_p95_s": round(percentile(interrupts, 95), 3),
        "bus_tok_s": round(bus_tok_s, 2),
        "engine_tok_s": round(engine_tok_s, 2),
        "bus_overhead_pct": round(100 * (engine_tok_s - bus_tok_s) / engine_tok_s, 2),
        "first_chunk_s": [round(x, 3) for x in firsts],
        "interrupt_s": [round(x, 3) for x in interrupts],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="5 turns, results to benchmarks/results/quick/"
    )
    parser.add_argument("--turns", type=int, default=None)
    args = parser.parse_args()
    turns = args.turns or (5 if args.quick else 20)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chorus-e2e-") as tmp:
        result = anyio.run(run, turns, Path(tmp) / "data")
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["quick"] = args.quick
    result["targets"] = {"first_chunk_p50_s": 1.5, "interrupt_p50_s": 0.25, "bus_overhead_pct": 5}
    path = write_json("e2e", result, quick=args.quick)
    print({k: v for k, v in result.items() if not isinstance(v, list)})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(result["first_chunk_s"], marker="o", label="first chunk")
    a.axhline(1.5, color="grey", linestyle="--", label="target 1.5 s")
    a.set_xlabel("turn")
    a.set_ylabel("seconds")
    a.set_title("user.in → first narrator chunk")
    a.legend()
    b.bar(
        ["bus (narrator)", "engine raw"],
        [result["bus_tok_s"], result["engine_tok_s"]],
        color=["#4c72b0", "#dd8452"],
    )
    b.set_ylabel("tokens/s")
    b.set_title(f"stream rate (overhead {result['bus_overhead_pct']}%)")
    save_plot(fig, "e2e", quick=args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
