"""The task graph: every task the controller hands out, its state and its edges, in
``data/tasks.graph.json``.

States::

    queued ──▶ assigned ──▶ running ──▶ succeeded
      │  ▲        │  │         │  │
      │  └────────┘  │         │  └──▶ failed ──▶ queued (a retry)
      │  (lost agent)└─▶ failed│
      └──▶ cancelled ◀─────────┘   (cancelled from any state that is not finished)

``assigned`` and ``running`` go back to ``queued`` when their agent is lost; ``failed``
goes back to ``queued`` for a retry. ``succeeded`` and ``cancelled`` are final. An
illegal transition raises :class:`IllegalTransition` and writes nothing. Entering
``assigned`` counts an attempt.

Every change is read-modify-write under an inter-process lock (``tasks.graph.json.lock``,
``flock``, released by the OS when its holder dies, so a killed process never leaves a
stale lock), written to a temp file, fsynced and renamed: a reader, which takes no lock,
sees the old graph or the new one, never half of one. A graph file that is not JSON is
moved aside to ``tasks.graph.json.corrupt-<time>`` with a loud warning and a fresh graph
starts. Finished tasks older than a retention move to ``tasks.archive.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal, TypeVar, get_args

import msgspec
import structlog
from filelock import FileLock, Timeout

from runtime.errors import ChorusError
from runtime.paths import DataDir, write_atomic

log = structlog.get_logger("task_graph")

NodeState = Literal["queued", "assigned", "running", "succeeded", "failed", "cancelled"]
NODE_STATES: tuple[NodeState, ...] = get_args(NodeState)

TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    "queued": frozenset({"assigned", "cancelled"}),
    "assigned": frozenset({"running", "queued", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "queued"}),
    "failed": frozenset({"queued"}),
    "succeeded": frozenset(),
    "cancelled": frozenset(),
}
FINISHED: frozenset[NodeState] = frozenset({"succeeded", "failed", "cancelled"})
GRAPH_VERSION = 1
ARCHIVE_EVERY_S = 3600  # how often writes archive finished tasks past retain_s
ARCHIVE_RETAIN_S = 90 * 86400  # archived tasks not updated for this long are dropped
# the archive is rewritten once its oldest task is this far past its retention: daily
ARCHIVE_SLACK_S = 86400

T = TypeVar("T")


class TaskGraphError(ChorusError):
    """Base of the task graph's errors."""


class IllegalTransition(TaskGraphError):
    """A task was asked to move to a state its current state cannot reach; nothing was
    written."""


class UnknownTask(TaskGraphError):
    """No task with that id is in the graph (it may have been archived)."""


class DuplicateTask(TaskGraphError):
    """A task with that id is already in the graph."""


class GraphLocked(TaskGraphError):
    """The graph's lock was not free within the timeout."""


class TaskNode(msgspec.Struct, frozen=True, kw_only=True):
    """One task: what it is, who holds it, where it stands."""

    id: str
    kind: str
    state: NodeState = "queued"
    conversation: str | None = None
    agent: str | None = None
    parent: str | None = None
    depends_on: list[str] = msgspec.field(default_factory=list)
    created: float
    updated: float
    started: float | None = None  # when it last started running
    finished: float | None = None  # when it reached succeeded, failed or cancelled
    attempts: int = 0  # times it was assigned
    result: str | None = None  # a summary of what it produced
    error: str | None = None  # why it last failed, or was cancelled or requeued
    turn: str | None = None  # the user turn it serves (the id of its ``user.in`` envelope)

    def duration(self, now: float) -> float:
        """Seconds it ran (so far, when running), or has waited when not yet started."""
        if self.started is None:
            return (self.finished or now) - self.created
        return (self.finished or now) - self.started


class TaskGraphFile(msgspec.Struct, kw_only=True):
    """The contents of ``tasks.graph.json``."""

    version: int = GRAPH_VERSION
    revision: int = 0  # one more on every write
    updated: float = 0.0
    nodes: dict[str, TaskNode] = msgspec.field(default_factory=dict)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(TaskGraphFile)
_node_decoder = msgspec.json.Decoder(TaskNode)


class TaskGraph:
    """The task graph file of one data directory; safe to use from many processes.

    Finished tasks not updated for ``retain_s`` (7 days) move to the archive: the first
    write of each hour does it, or :meth:`archive` when called. Archived tasks not
    updated for ``archive_retain_s`` (90 days; None keeps them for ever) are dropped
    from the archive as it is written, at most daily.
    """

    def __init__(
        self,
        path: Path,
        *,
        lock_timeout: float = 30.0,
        retain_s: float = 7 * 86400,
        archive_retain_s: float | None = ARCHIVE_RETAIN_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.archive_path = self.path.with_name("tasks.archive.jsonl")
        self.lock_timeout = lock_timeout
        self.retain_s = retain_s
        self.archive_retain_s = archive_retain_s
        self._clock = clock
        self._last_archive = -float("inf")  # the first write archives what is due
        # a short poll: writes take milliseconds, and a waiter should not sleep past them
        self._lock = FileLock(self.lock_path, timeout=lock_timeout, poll_interval=0.005)

    @classmethod
    def at(cls, data_dir: str | os.PathLike[str] | None = None) -> TaskGraph:
        """The graph of a data directory (``DataDir.at`` rules)."""
        return cls(DataDir.at(data_dir).task_graph)

    # -- reading --------------------------------------------------------------------------

    def read(self) -> TaskGraphFile:
        """The graph as last written; an empty one when there is no file yet."""
        try:
            return _decoder.decode(self.path.read_bytes())
        except FileNotFoundError:
            return TaskGraphFile()
        except (msgspec.DecodeError, msgspec.ValidationError):
            # move it aside under the lock, unless a writer already has
            return self._locked(lambda graph: (graph, False))

    def get(self, task_id: str) -> TaskNode:
        """One task; raises :class:`UnknownTask`."""
        node = self.read().nodes.get(task_id)
        if node is None:
            raise UnknownTask(f"no task {task_id!r} in {self.path} (archived, or never added)")
        return node

    def nodes(
        self,
        *,
        states: Collection[NodeState] = (),
        conversation: str | None = None,
    ) -> list[TaskNode]:
        """Tasks in creation order, optionally only those in ``states`` or one conversation."""
        return select(self.read().nodes.values(), states=states, conversation=conversation)

    def ready(self) -> list[TaskNode]:
        """Queued tasks whose dependencies have all succeeded, oldest first."""
        nodes = self.read().nodes
        return [
            n
            for n in select(nodes.values())
            if n.state == "queued"
            and all(d in nodes and nodes[d].state == "succeeded" for d in n.depends_on)
        ]

    # -- writing --------------------------------------------------------------------------

    def update(self, change: Callable[[TaskGraphFile], T]) -> T:
        """Run ``change`` on the current graph under the lock and write the result.

        If ``change`` raises, nothing is written. This is the one write path; the
        methods below are built on it. ``change`` may mutate ``nodes`` in place.
        """
        return self._locked(lambda graph: (change(graph), True))

    def _locked(self, change: Callable[[TaskGraphFile], tuple[T, bool]]) -> T:
        """Under the lock: load, ``change`` (which says whether to write), write."""
        try:
            with self._lock:
                self._remove_stale_temps()
                graph = self._load_locked()
                outcome, write = change(graph)
                if write:
                    now = self._clock()
                    if now - self._last_archive >= ARCHIVE_EVERY_S:
                        self._archive_locked(graph, now - self.retain_s)
                    graph.revision += 1
                    graph.updated = now
                    write_atomic(self.path, _encoder.encode(graph))
                return outcome
        except Timeout:
            raise GraphLocked(
                f"the task graph lock {self.lock_path} was not free within "
                f"{self.lock_timeout:g}s: another process is holding it; try again"
            ) from None

    def add(
        self,
        task_id: str,
        *,
        kind: str,
        conversation: str | None = None,
        parent: str | None = None,
        depends_on: Sequence[str] = (),
        agent: str | None = None,
        turn: str | None = None,
    ) -> TaskNode:
        """Add a queued task. ``parent`` and ``depends_on`` must name tasks in the graph."""

        def change(graph: TaskGraphFile) -> TaskNode:
            if task_id in graph.nodes:
                raise DuplicateTask(f"task {task_id!r} is already in the graph")
            for other in (parent, *depends_on):
                if other is not None and other not in graph.nodes:
                    raise UnknownTask(
                        f"task {task_id!r} refers to {other!r}, which is not in the graph"
                    )
            now = self._clock()
            node = TaskNode(
                id=task_id,
                kind=kind,
                conversation=conversation,
                parent=parent,
                depends_on=list(depends_on),
                agent=agent,
                created=now,
                updated=now,
                turn=turn,
            )
            graph.nodes[task_id] = node
            return node

        return self.update(change)

    def transition(
        self,
        task_id: str,
        to: NodeState,
        *,
        agent: str | None = None,
        result: str | None = None,
        error: str | None = None,
    ) -> TaskNode:
        """Move a task to ``to``; a move to the state it is in already changes nothing.

        ``agent`` goes with ``assigned``, ``result`` with ``succeeded``, ``error`` with
        ``failed``, ``cancelled`` or ``queued`` (why it was requeued). Raises
        :class:`IllegalTransition` (and writes nothing) for a move the state machine
        does not allow, :class:`UnknownTask` for an id not in the graph.
        """
        if to not in TRANSITIONS:
            raise IllegalTransition(f"{to!r} is not a task state; states: {', '.join(NODE_STATES)}")

        def change(graph: TaskGraphFile) -> tuple[TaskNode, bool]:
            node = graph.nodes.get(task_id)
            if node is None:
                raise UnknownTask(f"no task {task_id!r} in {self.path} (archived, or never added)")
            if node.state == to:
                return node, False
            if to not in TRANSITIONS[node.state]:
                allowed = ", ".join(sorted(TRANSITIONS[node.state])) or "nothing (it is final)"
                raise IllegalTransition(
                    f"task {task_id!r} cannot go from {node.state} to {to}; "
                    f"from {node.state} it can go to {allowed}"
                )
            node = _moved(node, to, self._clock(), agent=agent, result=result, error=error)
            graph.nodes[task_id] = node
            return node, True

        return self._locked(change)

    def archive(self, *, older_than_s: float | None = None, now: float | None = None) -> list[str]:
        """Move finished tasks last updated more than ``older_than_s`` ago (default: the
        graph's ``retain_s``) to ``tasks.archive.jsonl``, one node per line; returns
        their ids.

        A finished task stays while a task that remains points at it (as parent or
        dependency), so whole finished subtrees leave together. The archive is appended
        and fsynced before the graph is rewritten: a crash in between leaves a task in
        both, never in neither. Writes also archive by themselves, at most hourly.
        """
        now = self._clock() if now is None else now
        keep_s = self.retain_s if older_than_s is None else older_than_s

        def change(graph: TaskGraphFile) -> tuple[list[str], bool]:
            moved = self._archive_locked(graph, now - keep_s)
            return moved, bool(moved)

        return self._locked(change)

    def archived(self) -> list[TaskNode]:
        """The tasks in ``tasks.archive.jsonl``, oldest archived first."""
        try:
            data = self.archive_path.read_bytes()
        except FileNotFoundError:
            return []
        return [_node_decoder.decode(line) for line in data.splitlines() if line.strip()]

    # -- under the lock -------------------------------------------------------------------

    def _archive_locked(self, graph: TaskGraphFile, cutoff: float) -> list[str]:
        """Move finished tasks updated before ``cutoff`` out of ``graph`` into the archive."""
        self._last_archive = self._clock()
        gone = {n.id for n in graph.nodes.values() if n.state in FINISHED and n.updated <= cutoff}
        while gone:  # keep any task that a remaining task still points at
            needed = {
                ref
                for n in graph.nodes.values()
                if n.id not in gone
                for ref in (n.parent, *n.depends_on)
                if ref in gone
            }
            if not needed:
                break
            gone -= needed
        if not gone:
            return []
        moved = [n for n in graph.nodes.values() if n.id in gone]  # in creation order
        with self.archive_path.open("ab") as f:
            f.write(b"".join(_encoder.encode(n) + b"\n" for n in moved))
            f.flush()
            os.fsync(f.fileno())
        for node in moved:
            del graph.nodes[node.id]
        log.info("tasks_archived", count=len(moved), file=str(self.archive_path))
        self._prune_archive_locked(self._clock())
        return [n.id for n in moved]

    def _prune_archive_locked(self, now: float) -> None:
        """Drop archived tasks not updated for ``archive_retain_s``, once the oldest is
        ``ARCHIVE_SLACK_S`` past it. The archive is rewritten whole (temp file, fsync,
        rename), so a crash leaves the old archive or the new one; a line that does not
        decode is kept as it is."""
        if self.archive_retain_s is None:
            return
        cutoff = now - self.archive_retain_s
        try:
            with self.archive_path.open("rb") as f:
                oldest = next(filter(None, map(_updated, f)), now)  # the first that decodes
            if oldest > cutoff - ARCHIVE_SLACK_S:
                return
            lines = self.archive_path.read_bytes().splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and (_updated(line) or now) > cutoff]
            write_atomic(self.archive_path, b"".join(kept))
        except OSError as exc:  # the archive keeps what it had; the next pass tries again
            log.warning("task_archive_not_pruned", file=str(self.archive_path), error=str(exc))
            return
        log.info("task_archive_pruned", dropped=len(lines) - len(kept), kept=len(kept))

    def _load_locked(self) -> TaskGraphFile:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return TaskGraphFile()
        try:
            return _decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            aside = self._corrupt_name()
            os.replace(self.path, aside)
            log.error(
                "task_graph_corrupt",
                file=str(self.path),
                moved_to=str(aside),
                error=str(exc),
                action="a fresh, empty graph starts; the old one is kept for inspection",
            )
            return TaskGraphFile()

    def _corrupt_name(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        return aside

    def _remove_stale_temps(self) -> None:
        """Temp files of a writer that died mid-write (only a lock holder writes one,
        and we hold the lock, so any that exist are stale)."""
        prefix = f".{self.path.name}."
        try:
            names = os.listdir(self.path.parent)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(prefix):
                (self.path.parent / name).unlink(missing_ok=True)


def _moved(
    node: TaskNode,
    to: NodeState,
    now: float,
    *,
    agent: str | None,
    result: str | None,
    error: str | None,
) -> TaskNode:
    """``node`` after a legal move to ``to`` at ``now``."""
    changes: dict[str, object] = {"state": to, "updated": now}
    if to == "queued":
        changes.update(agent=None, started=None, finished=None, result=None)
        if error is not None:
            changes["error"] = error
    elif to == "assigned":
        changes.update(attempts=node.attempts + 1, error=None)
        if agent is not None:
            changes["agent"] = agent
    elif to == "running":
        changes["started"] = now
        if agent is not None:
            changes["agent"] = agent
    else:  # succeeded, failed, cancelled
        changes["finished"] = now
        if result is not None:
            changes["result"] = result
        if error is not None:
            changes["error"] = error
    return msgspec.structs.replace(node, **changes)


def select(
    nodes: Iterable[TaskNode],
    *,
    states: Collection[NodeState] = (),
    conversation: str | None = None,
) -> list[TaskNode]:
    """The nodes in ``states`` (all when empty) of one conversation (any when None),
    in creation order."""
    chosen = [
        n
        for n in nodes
        if (not states or n.state in states)
        and (conversation is None or n.conversation == conversation)
    ]
    chosen.sort(key=lambda n: (n.created, n.id))
    return chosen


# -- the CLI -----------------------------------------------------------------------------

_STATE_STYLE: dict[str, str] = {
    "queued": "dim",
    "assigned": "cyan",
    "running": "bold blue",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "yellow",
}


def format_duration(seconds: float) -> str:
    """``850ms``, ``12.3s``, ``4m02s``, ``1h05m``, ``2d03h``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m runtime tasks`` (``data_dir`` is the caller's)."""
    parser.add_argument(
        "--state",
        action="append",
        default=[],
        choices=NODE_STATES,
        help="only tasks in this state (repeatable)",
    )
    parser.add_argument("--conversation", "-c", metavar="ID", help="only this conversation")
    parser.add_argument("--tree", action="store_true", help="show parents and their subtasks")
    parser.add_argument("--json", action="store_true", help="one JSON node per line")


def _summary(node: TaskNode) -> str:
    text = node.error if node.state in ("failed", "cancelled", "queued") and node.error else None
    return (text or node.result or "").replace("\n", " ")


def _duration_text(node: TaskNode, now: float) -> str:
    word = "waited" if node.started is None else ("ran" if node.finished else "running")
    return f"{word} {format_duration(node.duration(now))}"


def run_tasks(args: argparse.Namespace) -> int:
    """``python -m runtime tasks``: the task graph as a table, a tree or JSON lines."""
    graph = TaskGraph.at(getattr(args, "data_dir", None))
    try:
        all_nodes = graph.read().nodes
    except TaskGraphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    nodes = select(all_nodes.values(), states=args.state, conversation=args.conversation)
    now = time.time()
    out = sys.stdout
    if args.json:
        out.write("".join(_encoder.encode(n).decode() + "\n" for n in nodes))
        return 0
    if not nodes:
        print("no tasks" + (" match" if args.state or args.conversation else ""), file=sys.stderr)
        return 0
    if args.tree:
        _print_tree(nodes, now, rich=out.isatty())
    else:
        _print_table(nodes, now, rich=out.isatty())
    return 0


_COLUMNS = ("id", "state", "kind", "agent", "conversation", "tries", "time", "result / error")


def _row(node: TaskNode, now: float) -> list[str]:
    return [
        node.id,
        node.state,
        node.kind,
        node.agent or "",
        node.conversation or "",
        str(node.attempts),
        _duration_text(node, now),
        _summary(node),
    ]


def _print_table(nodes: list[TaskNode], now: float, *, rich: bool) -> None:
    rows = [_row(n, now) for n in nodes]
    if rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for name in _COLUMNS:
            table.add_column(name, no_wrap=name != "result / error", overflow="fold")
        for node, row in zip(nodes, rows, strict=True):
            table.add_row(*row, style=_STATE_STYLE.get(node.state, ""))
        Console().print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    for row in [[c.upper() for c in _COLUMNS], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _tree_label(node: TaskNode, now: float) -> str:
    parts = [node.id, node.kind, f"[{node.state}]"]
    if node.agent:
        parts.append(f"@{node.agent}")
    parts.append(_duration_text(node, now))
    if node.depends_on:
        parts.append("after " + ",".join(node.depends_on))
    summary = _summary(node)
    if summary:
        parts.append(f"— {summary}")
    return " ".join(parts)


def _children(nodes: list[TaskNode]) -> tuple[list[TaskNode], dict[str, list[TaskNode]]]:
    """Roots (no parent among ``nodes``) and each node's children, in creation order."""
    ids = {n.id for n in nodes}
    children: dict[str, list[TaskNode]] = {}
    roots: list[TaskNode] = []
    for n in nodes:
        if n.parent is not None and n.parent in ids:
            children.setdefault(n.parent, []).append(n)
        else:
            roots.append(n)
    return roots, children


def _print_tree(nodes: list[TaskNode], now: float, *, rich: bool) -> None:
    roots, children = _children(nodes)
    if rich:
        from rich.console import Console
        from rich.markup import escape
        from rich.tree import Tree

        top = Tree("tasks", hide_root=True)

        def grow(branch: Tree, node: TaskNode) -> None:
            style = _STATE_STYLE.get(node.state, "")
            sub = branch.add(f"[{style}]{escape(_tree_label(node, now))}[/]" if style else "")
            for child in children.get(node.id, []):
                grow(sub, child)

        for root in roots:
            grow(top, root)
        Console().print(top)
        return
    lines: list[str] = []

    def walk(node: TaskNode, prefix: str, last: bool, top_level: bool) -> None:
        joint = "" if top_level else ("└── " if last else "├── ")
        lines.append(prefix + joint + _tree_label(node, now))
        kids = children.get(node.id, [])
        below = prefix if top_level else prefix + ("    " if last else "│   ")
        for i, child in enumerate(kids):
            walk(child, below, i == len(kids) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestrator.task_graph``: the ``tasks`` command on its own."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.task_graph", description="Show the Chorus task graph."
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="the data directory (default $CHORUS_DATA_DIR or ./data)"
    )
    add_arguments(parser)
    return run_tasks(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


def _updated(line: bytes) -> float | None:
    """When the archived task on ``line`` was last updated; None if it does not decode
    (such a line is never dropped)."""
    try:
        return _node_decoder.decode(line).updated
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
