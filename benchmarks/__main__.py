"""``python -m benchmarks [--quick | --full] [NAME…]``: run the benchmarks one by one.

Quick runs write to ``benchmarks/results/quick/`` and never overwrite the committed
full results in ``benchmarks/results/``. A run of every benchmark also records how long
each took, in ``benchmarks/results/make_bench.json`` for ``--quick`` (target: 30 minutes
in all; committed, as the record of what ``make bench`` costs) and
``make_bench_full.json`` for ``--full``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

QUICK_TARGET_S = 30 * 60  # `make bench` (every benchmark, --quick) on the 2-core box
ALL = [
    "bus",
    "log_query",
    "retention",
    "routing",
    "retrieval",
    "e2e",
    "faults",
    "load",
    "engine_perplexity",
    "engine_constant_cost",
    "engine_recompute",
    "engine_throughput",
]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (the default)")
    size.add_argument("--full", action="store_true", help="the sizes the issues name")
    parser.add_argument(
        "names", nargs="*", choices=[*ALL, []], metavar="NAME", help=f"some of: {', '.join(ALL)}"
    )
    args = parser.parse_args()
    failed = []
    seconds: dict[str, float] = {}
    begun = time.monotonic()
    for name in args.names or ALL:
        started = time.monotonic()
        argv = [sys.executable, "-m", f"benchmarks.{name}", *([] if args.full else ["--quick"])]
        print(f"== {name}: {' '.join(argv[1:])}", flush=True)
        code = subprocess.call(argv)
        seconds[name] = round(time.monotonic() - started, 1)
        print(f"== {name}: exit {code} in {seconds[name]:.0f} s", flush=True)
        if code:
            failed.append(name)
    total = time.monotonic() - begun
    print(f"== all: {total / 60:.1f} min", flush=True)
    if not args.names:  # the whole set: what `make bench` promises is timed
        from benchmarks._common import write_json

        quick = not args.full
        record = {
            "quick": quick,
            "seconds": seconds,
            "total_s": round(total, 1),
            "failed": failed,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        if quick:
            record |= {"target_total_s": QUICK_TARGET_S, "total_met": total <= QUICK_TARGET_S}
        write_json("make_bench" if quick else "make_bench_full", record, quick=False)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
