"""A task-graph writer that the tests run as a separate process.

``cycle PATH NODE COUNT``: COUNT transitions of task NODE round assigned → running →
failed → queued, one locked write each.
``hold PATH``: take the graph's lock, say ``locked``, and sleep (to be killed).
``churn PATH``: rewrite a large graph forever, saying ``ready`` first (to be killed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from orchestrator.task_graph import NodeState, TaskGraph, TaskGraphFile

CYCLE: tuple[NodeState, ...] = ("assigned", "running", "failed", "queued")


def _bump(graph: TaskGraphFile) -> None:
    """Change nothing: the write itself (the revision goes up by one) is the point."""


def main(argv: list[str]) -> int:
    mode, path = argv[0], Path(argv[1])
    graph = TaskGraph(path, lock_timeout=60)
    if mode == "cycle":
        node, count = argv[2], int(argv[3])
        for j in range(count):
            graph.transition(node, CYCLE[j % len(CYCLE)], agent="test")
    elif mode == "hold":
        with graph._lock:
            print("locked", flush=True)
            time.sleep(60)
    elif mode == "churn":
        print("ready", flush=True)
        while True:
            graph.update(_bump)
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
