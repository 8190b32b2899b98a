"""``python -m benchmarks [--quick | --full] [NAME…]``: run the benchmarks one by one.

Quick runs write to ``benchmarks/results/quick/`` and never overwrite the committed
full results in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

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
    for name in args.names or ALL:
        started = time.monotonic()
        argv = [sys.executable, "-m", f"benchmarks.{name}", *([] if args.full else ["--quick"])]
        print(f"== {name}: {' '.join(argv[1:])}", flush=True)
        code = subprocess.call(argv)
        print(f"== {name}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
