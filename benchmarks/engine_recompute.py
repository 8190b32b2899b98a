"""StreamingLLM decode against sliding window with re-computation, per token.

At each cache size N (256, 512, 1024, 2048), on the default model (SmolLM2-135M-Instruct,
fp32, CPU), one new token costs:

- streaming: one ``Model.decode`` step on a full StreamingLLM cache (``sink=4,
  window=N-4``, filled with N + 64 tokens of Python's docs, so the ring has wrapped);
- recompute: a fresh forward over the last N tokens (``Model.prefill`` into an empty
  ``sink=0, window=N`` cache, one chunk, logits of the last token only), which is what
  sliding window with re-computation pays per token (the StreamingLLM paper's Figure 10).

The two are measured interleaved, ``--rounds`` rounds per size: each round times
``--steps`` decode steps (teacher-forced, continuing the text) and one re-computation
over the window that ends at the same token. ``speedup`` = median recompute latency ÷
median decode latency (target ≥ 22× at N = 1024). ``cpu_speedup`` is the same ratio on
the calling thread's CPU time (one torch thread, so the work runs there), which other
work on the machine disturbs less than wall time.

Run (from the repository root)::

    .venv/bin/python -m benchmarks.engine_recompute            # 5 rounds × 16 steps
    .venv/bin/python -m benchmarks.engine_recompute --quick    # 2 rounds × 8 steps

Writes ``benchmarks/results/engine_recompute.json`` and ``.png`` (``--quick``:
``benchmarks/results/quick/``).

Wall time on the 2-core development VM (AMD EPYC, one torch thread): the recorded full
run took 3 min 23 s at load average 1.5 (13.5 min at load 8, where the speedups came out
13-167×: wall time there follows other work, not the cache); ``--quick`` 1 min 27 s.
The re-computations dominate: 5 forwards each of 256, 512, 1,024 and 2,048 tokens.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._common import percentile, save_plot, write_json
from .engine_perplexity import machine, pydoc_tokens

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from engine.model import Model

SIZES = (256, 512, 1024, 2048)
SINK = 4
OVERFILL = 64  # tokens past the cache size before timing: the ring has wrapped
HEADLINE = 1024
TARGET_SPEEDUP = 22.0


def measure_size(
    model: Model, tokens: torch.Tensor, size: int, rounds: int, steps: int
) -> dict[str, Any]:
    """Decode and re-computation latencies (ms) at one cache size, interleaved by round."""
    cache = model.new_cache(sink=SINK, window=size - SINK)
    fed = size + OVERFILL
    model.prefill(tokens[:fed], cache, last_only=True)
    fresh = model.new_cache(sink=0, window=size)
    decode_ms: list[float] = []
    recompute_ms: list[float] = []
    decode_cpu_ms: list[float] = []
    recompute_cpu_ms: list[float] = []
    for _ in range(rounds):
        for _ in range(steps):
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            model.decode(tokens[fed : fed + 1], [cache])
            decode_ms.append((time.perf_counter_ns() - t0) / 1e6)
            decode_cpu_ms.append((time.thread_time_ns() - c0) / 1e6)
            fed += 1
        fresh.reset()
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        model.prefill(tokens[fed - size : fed], fresh, chunk_size=size, last_only=True)
        recompute_ms.append((time.perf_counter_ns() - t0) / 1e6)
        recompute_cpu_ms.append((time.thread_time_ns() - c0) / 1e6)
    streaming, recompute = float(np.median(decode_ms)), float(np.median(recompute_ms))
    cpu_speedup = float(np.median(recompute_cpu_ms) / np.median(decode_cpu_ms))
    print(
        f"N={size:>5}: decode {streaming:8.1f} ms (p90 {percentile(decode_ms, 90):.1f}), "
        f"recompute {recompute:9.1f} ms, speedup {recompute / streaming:6.1f}× "
        f"(CPU time: {cpu_speedup:.1f}×)",
        flush=True,
    )
    return {
        "streaming_ms": round(streaming, 2),
        "streaming_p90_ms": round(percentile(decode_ms, 90), 2),
        "recompute_ms": round(recompute, 1),
        "recompute_min_ms": round(min(recompute_ms), 1),
        "recompute_max_ms": round(max(recompute_ms), 1),
        "speedup": round(recompute / streaming, 1),
        "streaming_cpu_ms": round(float(np.median(decode_cpu_ms)), 2),
        "recompute_cpu_ms": round(float(np.median(recompute_cpu_ms)), 1),
        "cpu_speedup": round(cpu_speedup, 1),
        "decode_samples": len(decode_ms),
        "recompute_samples": len(recompute_ms),
    }


def plot(per_size: dict[str, dict[str, Any]], title: str) -> Figure:
    """Per-token latency of both methods against cache size (log-log), and the speedups."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8))
    latency, speedup = fig.subplots(1, 2)
    sizes = [int(s) for s in per_size]
    for colour, method, label in (
        ("C0", "streaming", "StreamingLLM decode"),
        ("C1", "recompute", "re-computation"),
    ):
        for key, style, clock in (
            (f"{method}_ms", "o-", "wall"),
            (f"{method}_cpu_ms", "s--", "CPU"),
        ):
            values = [per_size[str(s)][key] for s in sizes]
            latency.plot(sizes, values, style, color=colour, label=f"{label}, {clock}")
    latency.set_xscale("log", base=2)
    latency.set_yscale("log")
    latency.set_xticks(sizes, [str(s) for s in sizes])
    latency.set_xlabel("cache size N (tokens)")
    latency.set_ylabel("ms per new token (median; dashed: CPU time)")
    latency.set_title("per-token latency")
    latency.legend()
    x = np.arange(len(sizes))
    for offset, key, label in ((-0.2, "speedup", "wall time"), (0.2, "cpu_speedup", "CPU time")):
        values = [per_size[str(s)][key] for s in sizes]
        drawn = speedup.bar(x + offset, values, width=0.4, label=label)
        speedup.bar_label(drawn, labels=[f"{v:.0f}×" for v in values], fontsize=8)
    speedup.set_xticks(x, [str(s) for s in sizes])
    speedup.axhline(
        TARGET_SPEEDUP, color="grey", linestyle="--", label=f"target {TARGET_SPEEDUP:.0f}× at 1024"
    )
    speedup.set_xlabel("cache size N (tokens)")
    speedup.set_ylabel("re-computation ÷ StreamingLLM")
    speedup.set_title("speedup")
    speedup.legend()
    fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Measure every size, print the table, write ``engine_recompute.json`` and ``.png``."""
    parser = argparse.ArgumentParser(description="StreamingLLM decode vs re-computation.")
    parser.add_argument("--quick", action="store_true", help="2 rounds × 8 steps (~2 min)")
    parser.add_argument("--rounds", type=int, help="rounds per size (default 5; quick 2)")
    parser.add_argument("--steps", type=int, help="decode steps per round (default 16; quick 8)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(SIZES), help="cache sizes (default 256-2048)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (8 if args.quick else 16)
    torch.set_num_threads(args.threads)
    from engine.weights import load_model

    started = time.perf_counter()
    model, tokenizer = load_model(device="cpu", dtype=torch.float32)
    need = max(args.sizes) + OVERFILL + rounds * steps
    tokens = torch.tensor(pydoc_tokens(tokenizer, need))
    per_size = {str(s): measure_size(model, tokens, s, rounds, steps) for s in sorted(args.sizes)}
    wall_s = round(time.perf_counter() - started, 1)
    print(f"\n{'N':>6}{'decode ms':>12}{'recompute ms':>14}{'speedup':>10}{'CPU speedup':>13}")
    for size, r in per_size.items():
        print(
            f"{size:>6}{r['streaming_ms']:>12.1f}{r['recompute_ms']:>14.1f}"
            f"{r['speedup']:>9.1f}×{r['cpu_speedup']:>12.1f}×"
        )
    headline = per_size.get(str(HEADLINE), {}).get("speedup")
    met = headline is not None and headline >= TARGET_SPEEDUP
    if headline is not None:
        print(
            f"\nspeedup at N={HEADLINE}: {headline:.1f}× (target ≥ {TARGET_SPEEDUP:.0f}×: {'met' if met else 'MISSED'})"
        )
    result = {
        "speedup": {size: r["speedup"] for size, r in per_size.items()},
        "cpu_speedup": {size: r["cpu_speedup"] for size, r in per_size.items()},
        "target": {"speedup_min": TARGET_SPEEDUP, "at": HEADLINE},
        "met": met,
        "per_size": per_size,
        "rounds": rounds,
        "steps_per_round": steps,
        "sink": SINK,
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "quick": args.quick,
        "wall_s": wall_s,
        "machine": machine(args.threads),
    }
    json_path = write_json("engine_recompute", result, quick=args.quick)
    title = f"StreamingLLM vs sliding window with re-computation ({'quick, ' if args.quick else ''}SmolLM2-135M, CPU)"
    png_path = save_plot(plot(per_size, title), "engine_recompute", quick=args.quick)
    print(f"\nwrote {json_path} and {png_path} in {wall_s} s")


if __name__ == "__main__":
    main()
