"""The figures table of ``benchmarks/README.md``, built from ``benchmarks/results/*.json``.

``python -m benchmarks.summary`` prints the table; ``--write`` puts it into the README
between its ``figures`` markers. A test fails when the README's table differs from what
the committed results give, so the README never shows figures that are not recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"

Figures = dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """One benchmark's row: what it claims, its target, and how to read its result file."""

    name: str
    claim: str
    target: str
    latest: Callable[[Figures], str]
    met: Callable[[Figures], str]


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def pct(v: float) -> str:
    return f"{v:.0f}%"


def _bus(d: Figures) -> str:
    return (
        f"ratio {d['ratio']:.2f} sustained (flat out {d['flat_out_ratio']:.2f}, the broker path "
        f"dropping {d['flat_out_broker_dropped_pct']:.0f}%), "
        f"p50 {d['p50_us'] / 1000:.2f} ms, p99 {d['p99_us'] / 1000:.2f} ms"
    )


def _bus_quiet(d: Figures) -> str:
    return (
        f"p50 {d['p50_us'] / 1000:.2f} ms, p99 {d['p99_us'] / 1000:.2f} ms (direct "
        f"{d['direct_p99_us'] / 1000:.2f}, C proxy {d['proxy_p99_us'] / 1000:.2f}) on "
        f"{d['machine']['cpus_usable']} of {d['machine']['cpu_count']} CPUs"
    )


def _throughput(d: Figures) -> str:
    a = d["aggregate_tok_s"]
    return (
        f"{d['engine_tok_s']:.1f} vs {d['hf_generate_tok_s']:.1f} tok/s = {d['ratio']:.2f}×; "
        f"8 sessions {a['8'] / a['1']:.2f}× one; {d['fraction_of_bound']:.0%} of the bandwidth bound"
    )


def _throughput_met(d: Figures) -> str:
    aggregate = d["aggregate_tok_s"]
    return f"{yes(d['ratio'] >= 1.5)}; {yes(aggregate['8'] >= 2 * aggregate['1'])}"


def _faults(d: Figures) -> str:
    faults = d["faults"]
    answered = sum(f["answered"] for f in faults)
    playbook = sum(f["playbook"] for f in faults)
    return (
        f"{len(faults)} faults: {answered} turns answered, {playbook} playbook, "
        f"{d['lost_turns']} lost"
    )


def _load(d: Figures) -> str:
    rows = d["per_n"]
    parts = [f"N={n}: p95 {r['p95_s']:.1f} s, {r['errors']} errors" for n, r in rows.items()]
    text = f"knee N={d['knee_n']}; " + "; ".join(parts)
    soak_file = RESULTS / "soak.json"
    if soak_file.exists():
        soak = json.loads(soak_file.read_text())
        text += (
            f"; soak {soak['seconds'] / 60:.0f} min: fds +{soak['max_fds_growth']}, "
            f"RSS up to +{soak['max_rss_growth_pct']:.0f}%"
        )
    return text


def _make_bench(d: Figures) -> str:
    slowest = sorted(d["seconds"].items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{name} {s / 60:.1f}" for name, s in slowest)
    failed = f"; failed: {', '.join(d['failed'])}" if d["failed"] else ""
    return f"{d['total_s'] / 60:.1f} min (slowest: {parts} min){failed}"


def _load_met(d: Figures) -> str:
    soak_file = RESULTS / "soak.json"
    if not soak_file.exists():
        return "knee: yes; soak: not run"
    soak = json.loads(soak_file.read_text())
    hour = "hour" if soak["seconds"] >= 3600 else f"{soak['seconds'] / 60:.0f} min"
    return f"knee: yes; soak ({hour}): {yes(soak['no_growth'])}"


CLAIMS = [
    Claim(
        "bus",
        "the broker keeps up with direct PUB/SUB",
        "ratio ≥ 0.4, p99 ≤ 2 ms",
        _bus,
        lambda d: f"ratio {yes(d['ratio'] >= 0.4)}, p99 {yes(d['p99_us'] <= 2000)}",
    ),
    Claim(
        "bus_h100_2cpu",
        "the same, on a quieter host (a lent GPU machine) held to 2 CPUs with `taskset`",
        "p99 ≤ 2 ms",
        _bus_quiet,
        lambda d: f"p99 {yes(d['p99_us'] <= 2000)}",
    ),
    Claim(
        "log_query",
        "`runtime logs` beats `grep \\| jq` on an hour of a day's log",
        "ratio ≥ 1",
        lambda d: f"{d['ratio']:.2f}× ({d['chorus_s']:.3f} s vs {d['grep_jq_s']:.3f} s)",
        lambda d: yes(d["ratio"] >= 1),
    ),
    Claim(
        "retention",
        "a week at a high rate: the log stays under its limit, nothing kept is lost, queries answer",
        "disk ≤ `retain_mb` at every sample, all checks",
        lambda d: (
            f"{d['simulated']['envelopes'] / 1e6:.2f} M envelopes over "
            f"{d['simulated']['days']:g} days: peak {d['disk']['max_settled_bytes'] / 2**20:.1f} of "
            f"{d['disk']['limit_bytes'] / 2**20:.0f} MiB; "
            f"{sum(v for k, v in d['checks'].items() if k != 'ok')} of {len(d['checks']) - 1} checks held"
        ),
        lambda d: yes(d["checks"]["ok"]),
    ),
    Claim(
        "routing",
        "the model router's output is a valid choice",
        "≥ 90% valid",
        lambda d: (
            f"{pct(d['model_valid_pct'])} valid; accuracy model {d['model_accuracy']:.2f}, "
            f"keywords {d['keyword_accuracy']:.2f}"
        ),
        lambda d: yes(d["model_valid_pct"] >= 90),
    ),
    Claim(
        "retrieval",
        "hybrid retrieval is at least as good as BM25",
        "hybrid recall@5 ≥ BM25",
        lambda d: (
            f"recall@5 hybrid {d['recall_at_5']['hybrid']:.3f}, "
            f"BM25 {d['recall_at_5']['bm25']:.3f}, dense {d['recall_at_5']['dense']:.3f}"
        ),
        lambda d: yes(d["recall_at_5"]["hybrid"] >= d["recall_at_5"]["bm25"]),
    ),
    Claim(
        "e2e",
        "first chunk, interruption, bus overhead",
        "p50 ≤ 1.5 s, ≤ 0.25 s, ≤ 5%",
        lambda d: (
            f"first chunk p50 {d['first_chunk_p50_s']:.2f} s, interrupt p50 "
            f"{d['interrupt_p50_s'] * 1000:.0f} ms, bus overhead {d['bus_overhead_pct']:.1f}%"
        ),
        lambda d: yes(
            d["first_chunk_p50_s"] <= 1.5
            and d["interrupt_p50_s"] <= 0.25
            and d["bus_overhead_pct"] <= 5
        ),
    ),
    Claim(
        "engine_perplexity",
        "StreamingLLM perplexity ≈ re-computation",
        "streaming ≤ 1.05 × recompute",
        lambda d: (
            f"{d['streaming_over_recompute']:.3f}× over {d['tokens']:,} tokens "
            f"(window-only {d['ratio_to_recompute']['window']:.2f}×)"
        ),
        lambda d: yes(d["streaming_over_recompute"] <= 1.05),
    ),
    Claim(
        "engine_constant_cost",
        "per-token cost and memory stay flat over a long stream",
        "last ÷ first ≤ 1.15, RSS < +2%",
        lambda d: (
            f"{d['tokens']:,} tokens: last ÷ first {d['latency_ratio_last_first']:.3f}, "
            f"RSS {d['memory_growth_pct']:+.1f}%"
        ),
        lambda d: yes(d["latency_ratio_last_first"] <= 1.15 and d["memory_growth_pct"] < 2),
    ),
    Claim(
        "engine_recompute",
        "StreamingLLM decode vs sliding window with re-computation",
        "≥ 22× at N = 1024",
        lambda d: ", ".join(f"{n}: {v:.0f}×" for n, v in d["speedup"].items()),
        lambda d: yes(d["speedup"]["1024"] >= 22),
    ),
    Claim(
        "engine_throughput",
        "decode speed vs `transformers` `generate`; batching",
        "≥ 1.5×; 8 sessions ≥ 2× one",
        _throughput,
        _throughput_met,
    ),
    Claim(
        "engine_throughput_cuda",
        "the same on a GPU, bf16 (a lent H100)",
        "≥ 1.5×; 8 sessions ≥ 2× one",
        _throughput,
        _throughput_met,
    ),
    Claim(
        "faults",
        "every user turn ends in an answer or an explicit message under faults",
        "0 lost turns",
        _faults,
        lambda d: yes(d["lost_turns"] == 0),
    ),
    Claim(
        "load",
        "N concurrent conversations (gateway and bus): where latency climbs; no growth in a soak",
        "knee written down; soak: no RSS / fd growth after warm-up",
        _load,
        _load_met,
    ),
    Claim(
        "make_bench",
        "`make bench`: every benchmark at `--quick` sizes",
        "≤ 30 min in all",
        _make_bench,
        lambda d: yes(d["total_s"] <= d["target_total_s"] and not d["failed"]),
    ),
]


def row(claim: Claim, results: Path = RESULTS) -> str:
    path = results / f"{claim.name}.json"
    link = f"[{claim.name}](#{claim.name})"
    if not path.exists():
        return f"| {link} | {claim.claim} | {claim.target} | no full run recorded yet | – |"
    d = json.loads(path.read_text())
    try:
        latest, met = claim.latest(d), claim.met(d)
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        latest, met = f"unreadable result ({type(exc).__name__}: {exc})", "–"
    return f"| {link} | {claim.claim} | {claim.target} | {latest} | {met} |"


def table(results: Path = RESULTS) -> str:
    lines = [
        "| benchmark | claim | target | latest full run | met |",
        "|---|---|---|---|---|",
        *(row(c, results) for c in CLAIMS),
    ]
    return "\n".join(lines) + "\n"


def with_table(readme: str, results: Path = RESULTS) -> str:
    """``readme`` with the text between the figures markers replaced by the table."""
    head, sep, rest = readme.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{README} lacks the {START} … {END} markers")
    return f"{head}{START}\n{table(results)}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"update {README.name} in place")
    args = parser.parse_args()
    if args.write:
        README.write_text(with_table(README.read_text()))
    else:
        sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
