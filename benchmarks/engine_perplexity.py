"""Perplexity over a long text: StreamingLLM against dense, window and re-computation.

The StreamingLLM paper's Table 1 and Figure 3 (Xiao et al. 2023) on our engine and the
default model (SmolLM2-135M-Instruct, fp32, CPU). The text is Python's bundled
documentation (``pydoc_data.topics.topics``, every topic in key order, joined by blank
lines), tokenised once; each method predicts every token from the ones before it:

- dense: a cache big enough never to evict (``sink=0``, ``window`` = the whole text), so
  past the model's 8192-token training length it sees positions it was never trained on;
- window: ``sink=0, window=N``, plain window attention, the paper's failing baseline;
- streaming: ``sink=4, window=N-4``, attention sinks plus a rolling window;
- recompute: sliding window with re-computation, a fresh forward over the N tokens that
  end at the query (positions 0..N-1 every time), the paper's quality oracle.

Dense, window and streaming feed the text through ``Model.prefill`` in 256-token chunks
and score every position. That equals decoding token by token: ``forward_chunk`` masks,
for each query, every key that was already evicted when that query arrived (a key is
visible if it is a sink or one of the query's last ``window`` tokens) and rotates the
query against the sinks by its own in-cache position. The script checks it: it decodes a
few tokens one at a time after the ring has wrapped and compares their log-probabilities
with the chunked pass (``token_by_token_check``).

Re-computation costs a full N-token forward per scored token, so it is scored on every
``stride``-th position only, and ``methods/*/ppl`` are all taken on exactly those positions
(the comparable numbers, the paper's Table 1); ``ppl_all`` is each method's perplexity over
every position. Up to position N the window holds the whole prefix, so every method is the
dense forward there and recompute reuses dense's log-probabilities.

Run (from the repository root)::

    .venv/bin/python -m benchmarks.engine_perplexity           # 16,384 tokens, N = 1024, stride 256
    .venv/bin/python -m benchmarks.engine_perplexity --quick   # 4,096 tokens, stride 256
    .venv/bin/python -m benchmarks.engine_perplexity --cache-sizes 256 512 1024

``--tokens`` and ``--stride`` scale it. Writes ``benchmarks/results/engine_perplexity.json``
and ``.png`` (``--quick``: ``benchmarks/results/quick/``). The headline ``cache_size`` is
the largest of ``--cache-sizes``; the others go under ``by_cache_size``.

Wall time on the 2-core development VM (AMD EPYC, one torch thread): the recorded full
run (16,384 tokens, N = 1024, stride 256) took 47 min with the machine's load average at
8-10 for its first 35 minutes (wall: dense 33 min, window 4, streaming 2, re-computation
7; 20 CPU-minutes in all), so about 20 min on a quiet machine. ``--quick`` took 19 min at load 9 (3 CPU-minutes),
about 4 min quiet. Each extra cache size adds two 16k-token passes and its
re-computations (~6 CPU-minutes at N = 1024).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._common import save_plot, write_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from transformers import PreTrainedTokenizerBase

    from engine.model import Model

CHUNK = 256  # prefill chunk of the streamed methods
SINK = 4
TRAINING_LENGTH = 8192  # SmolLM2's max_position_embeddings
TARGET_RATIO = 1.05  # streaming ppl ≤ 1.05 × recompute ppl
CHECK_TOKENS = 16  # decoded one at a time for the token-by-token check
METHODS = ("dense", "window", "streaming", "recompute")


def pydoc_tokens(tokenizer: PreTrainedTokenizerBase, count: int) -> list[int]:
    """The first ``count`` tokens of Python's bundled docs (the text repeats if it runs out).

    Shared by the engine benchmarks: a long, natural, deterministic text on every machine.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
    return (ids * (count // len(ids) + 1))[:count]


def machine(threads: int) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits. [C, V], [C] -> [C]"""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (-logp.gather(1, targets[:, None])[:, 0]).double().numpy()


def stream_nll(model: Model, tokens: torch.Tensor, sink: int, window: int) -> np.ndarray:
    """NLL of tokens 1..T-1, each predicted from the stream before it through one cache.

    Fed in ``CHUNK``-token prefills; the logits of each chunk are scored and dropped (all
    of them at once would take 4 bytes × vocabulary × T).
    """
    cache = model.new_cache(sink=sink, window=window)
    nll = np.empty(len(tokens) - 1)
    for start in range(0, len(tokens) - 1, CHUNK):
        end = min(start + CHUNK, len(tokens) - 1)
        logits = model.prefill(tokens[start:end], cache, chunk_size=CHUNK)  # [C, V]
        nll[start:end] = token_nll(logits, tokens[start + 1 : end + 1])
    return nll  # nll[p - 1] scores token p


def recompute_nll(
    model: Model, tokens: torch.Tensor, positions: np.ndarray, size: int, dense: np.ndarray
) -> tuple[np.ndarray, int]:
    """NLL of each token at ``positions`` from a fresh forward over the ``size`` tokens before it.

    Returns the NLLs and how many forwards ran (positions ≤ size reuse ``dense``: there the
    window is the whole prefix, and that forward is the dense one).
    """
    cache = model.new_cache(sink=0, window=size)
    out = np.empty(len(positions))
    forwards = 0
    for i, p in enumerate(positions):
        if p <= size:
            out[i] = dense[p - 1]
            continue
        cache.reset()
        logits = model.prefill(tokens[p - size : p], cache, chunk_size=size, last_only=True)
        out[i] = token_nll(logits, tokens[p : p + 1])[0]
        forwards += 1
    return out, forwards


def check_token_by_token(
    model: Model, tokens: torch.Tensor, size: int, chunked: np.ndarray
) -> dict[str, Any]:
    """Decode ``CHECK_TOKENS`` tokens one at a time, well after the ring wrapped, and
    compare their NLL with the chunked StreamingLLM pass at the same positions."""
    at = min(2 * size + 37, len(tokens) - CHECK_TOKENS - 1)  # mid-chunk, ring wrapped
    cache = model.new_cache(sink=SINK, window=size - SINK)
    model.prefill(tokens[:at], cache, chunk_size=CHUNK, last_only=True)
    decoded = np.empty(CHECK_TOKENS)
    for i in range(CHECK_TOKENS):
        logits = model.decode(tokens[at + i : at + i + 1], [cache])  # [1, V]
        decoded[i] = token_nll(logits, tokens[at + i + 1 : at + i + 2])[0]
    diff = np.abs(decoded - chunked[at : at + CHECK_TOKENS])
    return {
        "cache_size": size,
        "first_position": at + 1,
        "tokens": CHECK_TOKENS,
        "max_abs_nll_diff": float(diff.max()),
    }


def ppl(nll: np.ndarray) -> float:
    """Perplexity of a set of per-token NLLs."""
    return round(math.exp(float(np.mean(nll))), 3)


@dataclass
class CacheSizeResult:
    """Every method at one cache size: per-token NLLs and timings."""

    size: int
    positions: np.ndarray  # the scored subset, target indices
    nll: dict[str, np.ndarray]  # all positions (recompute: the subset)
    seconds: dict[str, float]
    recompute_forwards: int = 0
    check: dict[str, Any] = field(default_factory=dict)

    def subset(self, method: str) -> np.ndarray:
        """The method's NLLs on the scored subset."""
        nll = self.nll[method]
        scored: np.ndarray = nll if method == "recompute" else nll[self.positions - 1]
        return scored

    def summary(self) -> dict[str, Any]:
        """Perplexities (subset and all positions), the settings and ratios to recompute."""
        settings = {
            "dense": {"sink": 0, "window": len(self.nll["dense"]) + 1},
            "window": {"sink": 0, "window": self.size},
            "streaming": {"sink": SINK, "window": self.size - SINK},
            "recompute": {"context": self.size, "forwards": self.recompute_forwards},
        }
        subset_ppl = {m: ppl(self.subset(m)) for m in METHODS}
        methods = {
            m: {
                "ppl": subset_ppl[m],
                "ppl_all": None if m == "recompute" else ppl(self.nll[m]),
                **settings[m],
                "seconds": round(self.seconds[m], 1),
            }
            for m in METHODS
        }
        base = subset_ppl["recompute"]
        return {
            "cache_size": self.size,
            "scored_positions": len(self.positions),
            "methods": methods,
            "ratio_to_recompute": {m: round(v / base, 4) for m, v in subset_ppl.items()},
            "token_by_token_check": self.check,
        }


def measure(
    model: Model, tokens: torch.Tensor, sizes: list[int], stride: int
) -> tuple[list[CacheSizeResult], np.ndarray, float]:
    """Dense once, then window, streaming and recompute at every cache size."""
    t0 = time.perf_counter()
    dense = stream_nll(model, tokens, sink=0, window=len(tokens))
    dense_s = time.perf_counter() - t0
    print(f"dense: ppl {ppl(dense)} over {len(dense)} tokens in {dense_s:.0f} s", flush=True)
    positions = np.arange(stride, len(tokens), stride)
    results = []
    for size in sizes:
        nll, seconds = {"dense": dense}, {"dense": dense_s}
        for method, sink in (("window", 0), ("streaming", SINK)):
            t0 = time.perf_counter()
            nll[method] = stream_nll(model, tokens, sink=sink, window=size - sink)
            seconds[method] = time.perf_counter() - t0
            print(
                f"N={size} {method}: ppl {ppl(nll[method])} in {seconds[method]:.0f} s", flush=True
            )
        t0 = time.perf_counter()
        nll["recompute"], forwards = recompute_nll(model, tokens, positions, size, dense)
        seconds["recompute"] = time.perf_counter() - t0
        print(
            f"N={size} recompute: {forwards} forwards in {seconds['recompute']:.0f} s", flush=True
        )
        result = CacheSizeResult(size, positions, nll, seconds, forwards)
        result.check = check_token_by_token(model, tokens, size, nll["streaming"])
        results.append(result)
    return results, positions, dense_s


def print_table(results: list[CacheSizeResult], stride: int) -> None:
    """The paper's Table 1: perplexity per method (rows) and cache size (columns)."""
    sizes = [r.size for r in results]
    print(f"\nperplexity on every {stride}th position ({len(results[0].positions)} tokens):")
    print(f"{'method':<12}" + "".join(f"{f'N={s}':>12}" for s in sizes))
    for method in METHODS:
        print(f"{method:<12}" + "".join(f"{ppl(r.subset(method)):>12.2f}" for r in results))
    print("\nperplexity on every position:")
    for method in METHODS[:3]:
        print(f"{method:<12}" + "".join(f"{ppl(r.nll[method]):>12.2f}" for r in results))


def plot(result: CacheSizeResult, everything: list[CacheSizeResult], title: str) -> Figure:
    """Log-perplexity against tokens streamed (the paper's Figure 3): per bin over every
    position, and cumulative over the common positions with recompute; then a bar per
    method and cache size (the table)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 4.8), layout="constrained")
    local, cumulative, bars = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 3, 2]})
    total = len(result.nll["dense"]) + 1
    bin_size = max(CHUNK, total // 32)
    starts = np.arange(1, total, bin_size)
    for method in ("dense", "window", "streaming"):
        nll = result.nll[method]
        means = [float(np.mean(nll[lo - 1 : lo - 1 + bin_size])) for lo in starts]
        local.plot(starts + bin_size / 2, means, label=method)
    local.set_ylabel(f"log-perplexity (mean NLL per {bin_size}-token bin)")
    local.set_title(f"every position, cache size {result.size}")
    seen = np.arange(1, len(result.positions) + 1)
    for method in METHODS:
        running = np.cumsum(result.subset(method)) / seen
        cumulative.plot(result.positions, running, label=method)
    cumulative.set_ylabel("log-perplexity so far (mean NLL)")
    stride = int(result.positions[1] - result.positions[0])
    cumulative.set_title(f"every {stride}th position, cumulative, cache size {result.size}")
    for axes in (local, cumulative):
        axes.axvline(result.size, color="grey", linestyle=":", label=f"cache size {result.size}")
        if total > TRAINING_LENGTH:
            axes.axvline(TRAINING_LENGTH, color="grey", linestyle="--", label="training length")
        axes.set_xlabel("tokens streamed")
        axes.legend(fontsize=8)
    x = np.arange(len(METHODS))
    width = 0.8 / len(everything)
    for i, r in enumerate(everything):
        values = [ppl(r.subset(m)) for m in METHODS]
        offset = (i - (len(everything) - 1) / 2) * width
        drawn = bars.bar(x + offset, values, width, label=f"N={r.size}")
        bars.bar_label(drawn, labels=[f"{v:.1f}" for v in values], fontsize=7)
    bars.set_xticks(x, METHODS, fontsize=8)
    bars.set_yscale("log")
    bars.set_ylabel("perplexity on the common positions")
    bars.set_title("Table 1: the common positions")
    bars.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Score every method, print the table, write ``engine_perplexity.json`` and ``.png``."""
    parser = argparse.ArgumentParser(description="StreamingLLM perplexity over a long text.")
    parser.add_argument("--quick", action="store_true", help="4,096 tokens, stride 256 (~4 min)")
    parser.add_argument("--tokens", type=int, help="tokens of text (default 16,384; quick 4,096)")
    parser.add_argument("--stride", type=int, help="score every stride-th position (default 256)")
    parser.add_argument(
        "--cache-sizes", type=int, nargs="+", default=[1024], help="cache sizes N (default 1024)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    count = args.tokens or (4096 if args.quick else 16_384)
    stride = args.stride or 256
    sizes = sorted(set(args.cache_sizes))
    torch.set_num_threads(args.threads)
    from engine.weights import load_model

    started = time.perf_counter()
    model, tokenizer = load_model(device="cpu", dtype=torch.float32)
    tokens = torch.tensor(pydoc_tokens(tokenizer, count))
    results, positions, _ = measure(model, tokens, sizes, stride)
    wall_s = round(time.perf_counter() - started, 1)
    print_table(results, stride)
    head = results[-1].summary()
    ratio = head["ratio_to_recompute"]["streaming"]
    met = ratio <= TARGET_RATIO
    print(
        f"\nN={head['cache_size']}: streaming ÷ recompute = {ratio:.3f} "
        f"(target ≤ {TARGET_RATIO}: {'met' if met else 'MISSED'}); "
        f"window ÷ recompute = {head['ratio_to_recompute']['window']:.2f}; "
        f"token-by-token check max |ΔNLL| = {head['token_by_token_check']['max_abs_nll_diff']:.2e}"
    )
    result = {
        "tokens": count,
        "cache_size": head["cache_size"],
        "stride": stride,
        "scored_positions": len(positions),
        "methods": head["methods"],
        "ratio_to_recompute": head["ratio_to_recompute"],
        "streaming_over_recompute": ratio,
        "target": {"streaming_over_recompute_max": TARGET_RATIO},
        "met": met,
        "token_by_token_check": head["token_by_token_check"],
        "by_cache_size": {str(r.size): r.summary() for r in results},
        "text": "pydoc_data.topics.topics, sorted by key, joined by blank lines",
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "quick": args.quick,
        "wall_s": wall_s,
        "machine": machine(args.threads),
        "prefill_chunk": CHUNK,
    }
    json_path = write_json("engine_perplexity", result, quick=args.quick)
    title = (
        f"perplexity over {count:,} tokens of pydoc ({'quick, ' if args.quick else ''}SmolLM2-135M)"
    )
    png_path = save_plot(plot(results[-1], results, title), "engine_perplexity", quick=args.quick)
    print(f"\nwrote {json_path} and {png_path} in {wall_s} s")


if __name__ == "__main__":
    main()
