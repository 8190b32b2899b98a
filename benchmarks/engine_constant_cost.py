"""Constant cost per token: one StreamingLLM session decodes a long stream at a flat rate
in flat memory.

One session (``sink=4, window=1020``, the engine's default) takes ``--tokens`` tokens of
Python's bundled docs one ``Model.decode`` call at a time (teacher-forced: each call feeds
the next token of the text, so the stream never degenerates into a loop), in process, on
the default model (SmolLM2-135M-Instruct, fp32, CPU). Every step's wall time and the
main thread's CPU time are recorded, and the process's resident memory (psutil RSS)
after every 64 tokens. Per 1,024-token bucket the median latency counts; bucket 0 fills
the cache, so the first full bucket after the fill is bucket 1:

- ``latency_ratio_last_first`` = median wall latency of the last full bucket ÷ that of
  bucket 1 (target ≤ 1.15); ``cpu_ratio_last_first`` is the same on CPU time, which
  other work on the machine disturbs less;
- ``memory_growth_pct`` = RSS growth from the end of bucket 1 to the end, in % (target < 2).

The baseline, in the same run afterwards: a dense session (a cache that never evicts)
over the same text up to ``--dense-tokens``, brought to each 1,024-token mark with
chunked prefill (cheap) and then timed over the last 16 decode steps before the mark.
Its per-token latency grows with every token held, and so does its memory, by the keys
and values of each token (45 KiB for this model; drawn computed, not measured:
``SinkCache`` allocates its whole window up front, so RSS would show it all at once).

Wall time per token is at the mercy of other work on the machine (the load average is
recorded per bucket); CPU time per token (``time.thread_time_ns``; one torch thread, so
the decode runs on the calling thread) is not preempted and changes only with the work.

Run (from the repository root)::

    .venv/bin/python -m benchmarks.engine_constant_cost              # 50,000 tokens
    .venv/bin/python -m benchmarks.engine_constant_cost --quick      # 3,072 tokens
    .venv/bin/python -m benchmarks.engine_constant_cost --tokens 20000

Writes ``benchmarks/results/engine_constant_cost.json`` and ``.png`` (``--quick``:
``benchmarks/results/quick/``).

Wall time on the 2-core development VM (AMD EPYC, one torch thread): 15 tokens/s at
load average 1-3, so the default 50,000 tokens take about 57 min plus the dense
reference (2 min). The recorded run is the largest that fitted the time given to it::

    .venv/bin/python -m benchmarks.engine_constant_cost --tokens 16384 --dense-tokens 8192

21 min 8 s (18.7 min streaming, 2.4 min dense reference). ``--quick`` about 4 min.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import torch

from ._common import save_plot, write_json
from .engine_perplexity import machine, pydoc_tokens

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from engine.model import Model

BUCKET = 1024  # tokens per latency bucket; the cache (4 + 1020) fills in bucket 0
SINK, WINDOW = 4, 1020
RSS_EVERY = 64  # tokens between RSS samples
DENSE_TIMED = 16  # decode steps timed at each dense mark
TARGET_LATENCY_RATIO = 1.15
TARGET_MEMORY_GROWTH_PCT = 2.0


def stream(model: Model, tokens: list[int]) -> dict[str, np.ndarray]:
    """Decode every token through one StreamingLLM session; per-step wall and CPU ns, RSS."""
    process = psutil.Process()
    cache = model.new_cache(sink=SINK, window=WINDOW)
    wall = np.empty(len(tokens), dtype=np.int64)
    cpu = np.empty(len(tokens), dtype=np.int64)
    rss_at, rss, load = [], [], []
    for i, token in enumerate(tokens):
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        model.decode([token], [cache])
        wall[i], cpu[i] = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
        if (i + 1) % RSS_EVERY == 0:
            rss_at.append(i + 1)
            rss.append(process.memory_info().rss)
        if (i + 1) % BUCKET == 0:
            load.append(os.getloadavg()[0])  # other work on the machine moves wall time
            b = wall[i + 1 - BUCKET : i + 1]
            print(
                f"{i + 1:>7} tokens: median {np.median(b) / 1e6:6.1f} ms/token, "
                f"RSS {rss[-1] / 2**20:7.1f} MiB",
                flush=True,
            )
    return {
        "wall": wall,
        "cpu": cpu,
        "rss_at": np.array(rss_at),
        "rss": np.array(rss),
        "load": np.array(load),
    }


def dense_reference(model: Model, tokens: list[int], upto: int) -> dict[str, Any]:
    """A cache that never evicts, timed over 16 decode steps before every 1,024-token mark."""
    cache = model.new_cache(sink=0, window=upto)
    marks, median_ms, median_cpu_ms = [], [], []
    fed = 0
    for mark in range(BUCKET, upto + 1, BUCKET):
        if mark - DENSE_TIMED > fed:
            model.prefill(tokens[fed : mark - DENSE_TIMED], cache, last_only=True)
        wall, cpu = [], []
        for token in tokens[mark - DENSE_TIMED : mark]:
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            model.decode([token], [cache])
            wall.append(time.perf_counter_ns() - t0)
            cpu.append(time.thread_time_ns() - c0)
        fed = mark
        marks.append(mark)
        median_ms.append(round(float(np.median(wall)) / 1e6, 2))
        median_cpu_ms.append(round(float(np.median(cpu)) / 1e6, 2))
        print(
            f"dense {mark:>6}: median {median_ms[-1]:6.1f} ms/token, {median_cpu_ms[-1]:.1f} ms CPU"
        )
    return {"tokens": marks, "median_ms": median_ms, "median_cpu_ms": median_cpu_ms}


def kv_bytes_per_token(model: Model) -> int:
    """Keys and values one token adds to a cache that never evicts, over all layers."""
    a = model.args
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * torch.finfo(model.dtype).bits // 8


def buckets(values: np.ndarray) -> list[float]:
    """Median of each full bucket, in ms."""
    full = len(values) // BUCKET
    return [
        round(float(np.median(values[b * BUCKET : (b + 1) * BUCKET])) / 1e6, 2) for b in range(full)
    ]


def summarise(run: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-bucket medians, the last ÷ first ratios and the memory growth after the fill."""
    wall, cpu = buckets(run["wall"]), buckets(run["cpu"])
    if len(wall) < 3:
        raise SystemExit(f"need at least {3 * BUCKET} tokens: the fill, a first and a last bucket")
    rss_at, rss = run["rss_at"], run["rss"]
    after_fill = rss[np.searchsorted(rss_at, 2 * BUCKET)]  # the end of bucket 1
    growth = (rss[-1] - after_fill) / after_fill * 100
    return {
        "latency_ratio_last_first": round(wall[-1] / wall[1], 3),
        "cpu_ratio_last_first": round(cpu[-1] / cpu[1], 3),
        "memory_growth_pct": round(float(growth), 3),
        "memory_growth_mib": round(float(rss[-1] - after_fill) / 2**20, 2),
        "bucket_tokens": BUCKET,
        "bucket_median_ms": wall,
        "bucket_median_cpu_ms": cpu,
        "bucket_p90_ms": [
            round(float(np.percentile(run["wall"][b * BUCKET : (b + 1) * BUCKET], 90)) / 1e6, 2)
            for b in range(len(wall))
        ],
        "rss_after_fill_mib": round(float(after_fill) / 2**20, 1),
        "rss_end_mib": round(float(rss[-1]) / 2**20, 1),
        "bucket_load_average": [round(float(x), 2) for x in run["load"]],
        "tokens_per_s": round(float(len(run["wall"]) / (run["wall"].sum() / 1e9)), 2),
    }


def plot(
    run: dict[str, np.ndarray],
    summary: dict[str, Any],
    dense: dict[str, Any],
    kv_per_token: int,
    title: str,
) -> Figure:
    """Latency per bucket (wall and CPU, with the dense reference and the machine's load)
    and RSS over the stream, with what a dense cache would add."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.8), layout="constrained")
    latency, memory = fig.subplots(1, 2)
    mids = (np.arange(len(summary["bucket_median_ms"])) + 0.5) * BUCKET
    latency.plot(mids, summary["bucket_median_ms"], "o-", color="C0", label="StreamingLLM, wall")
    latency.plot(mids, summary["bucket_median_cpu_ms"], "s-", color="C1", label="StreamingLLM, CPU")
    if dense["tokens"]:
        latency.plot(dense["tokens"], dense["median_ms"], "^--", color="C0", label="dense, wall")
        latency.plot(dense["tokens"], dense["median_cpu_ms"], "^--", color="C1", label="dense, CPU")
    latency.axvline(SINK + WINDOW, color="grey", linestyle=":", label="cache full")
    latency.set_xlabel("tokens streamed")
    latency.set_ylabel(f"decode ms per token (median per {BUCKET}-token bucket)")
    latency.set_ylim(bottom=0)
    latency.set_title(
        f"last ÷ first bucket after the fill: {summary['latency_ratio_last_first']:.2f} wall, "
        f"{summary['cpu_ratio_last_first']:.2f} CPU"
    )
    load = latency.twinx()
    load.plot(mids, summary["bucket_load_average"], color="grey", linewidth=0.8, alpha=0.6)
    load.set_ylabel("machine load average (grey)", color="grey")
    load.set_ylim(bottom=0)
    latency.legend(fontsize=8, loc="lower right")
    memory.plot(run["rss_at"], run["rss"] / 2**20, label="StreamingLLM, measured RSS")
    start = summary["rss_after_fill_mib"]
    ends = np.array([2 * BUCKET, run["rss_at"][-1]])
    memory.plot(
        ends,
        start + (ends - 2 * BUCKET) * kv_per_token / 2**20,
        "--",
        color="C3",
        label=f"a dense cache: + {kv_per_token / 1024:.0f} KiB per token (computed)",
    )
    memory.axvline(2 * BUCKET, color="grey", linestyle=":", label="growth measured from here")
    memory.set_xlabel("tokens streamed")
    memory.set_ylabel("resident memory (MiB)")
    memory.set_title(f"RSS growth after the fill: {summary['memory_growth_pct']:+.2f}%")
    memory.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Stream, then the dense reference; print, write ``engine_constant_cost.json`` and ``.png``."""
    parser = argparse.ArgumentParser(description="StreamingLLM decode cost over a long stream.")
    parser.add_argument("--quick", action="store_true", help="3,072 tokens (~5 min)")
    parser.add_argument("--tokens", type=int, help="tokens to stream (default 50,000; quick 3,072)")
    parser.add_argument(
        "--dense-tokens", type=int, help="dense reference length (default 8,192; quick 2,048)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    count = args.tokens or (3 * BUCKET if args.quick else 50_000)
    dense_upto = (
        args.dense_tokens if args.dense_tokens is not None else (2048 if args.quick else 8192)
    )
    torch.set_num_threads(args.threads)
    from engine.weights import load_model

    started = time.perf_counter()
    model, tokenizer = load_model(device="cpu", dtype=torch.float32)
    tokens = pydoc_tokens(tokenizer, max(count, dense_upto))
    run = stream(model, tokens[:count])
    summary = summarise(run)
    stream_s = round(time.perf_counter() - started, 1)
    dense = dense_reference(model, tokens, dense_upto)
    kv_per_token = kv_bytes_per_token(model)
    wall_s = round(time.perf_counter() - started, 1)
    latency_met = summary["latency_ratio_last_first"] <= TARGET_LATENCY_RATIO
    memory_met = summary["memory_growth_pct"] < TARGET_MEMORY_GROWTH_PCT
    print(
        f"\n{count:,} tokens at {summary['tokens_per_s']} tok/s; last ÷ first bucket after the "
        f"fill: {summary['latency_ratio_last_first']:.3f} wall (target ≤ {TARGET_LATENCY_RATIO}: "
        f"{'met' if latency_met else 'MISSED'}), {summary['cpu_ratio_last_first']:.3f} CPU; "
        f"RSS growth {summary['memory_growth_pct']:+.2f}% (target < {TARGET_MEMORY_GROWTH_PCT}%: "
        f"{'met' if memory_met else 'MISSED'})"
    )
    result = {
        "tokens": count,
        "latency_ratio_last_first": summary.pop("latency_ratio_last_first"),
        "memory_growth_pct": summary.pop("memory_growth_pct"),
        "targets": {
            "latency_ratio_max": TARGET_LATENCY_RATIO,
            "memory_growth_pct_max": TARGET_MEMORY_GROWTH_PCT,
        },
        "latency_met": latency_met,
        "memory_met": memory_met,
        **summary,
        "dense_reference": dense,
        "dense_kv_bytes_per_token": kv_per_token,
        "sink": SINK,
        "window": WINDOW,
        "text": "pydoc_data.topics.topics, teacher-forced",
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "quick": args.quick,
        "stream_s": stream_s,
        "wall_s": wall_s,
        "machine": machine(args.threads),
    }
    json_path = write_json("engine_constant_cost", result, quick=args.quick)
    title = f"one session, {count:,} tokens decoded ({'quick, ' if args.quick else ''}SmolLM2-135M, CPU)"
    full = {**summary, **{k: result[k] for k in ("latency_ratio_last_first", "memory_growth_pct")}}
    png_path = save_plot(
        plot(run, full, dense, kv_per_token, title), "engine_constant_cost", quick=args.quick
    )
    print(f"\nwrote {json_path} and {png_path} in {wall_s} s")


if __name__ == "__main__":
    main()
