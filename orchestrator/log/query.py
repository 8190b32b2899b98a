"""Queries over the bus log: ``python -m runtime logs`` and ``python -m runtime decisions``.

Reading streams: files are picked by name (an hour file outside the time range is never
opened), read in 1 MiB blocks, and a closed hour with a minute index is read only over
the minutes asked for. Inside a block the most selective filter is a byte string (for
``--topic task.`` it is ``"topic":"task.``) found with ``bytes.find``; only lines that
hold it are decoded, and then only their head (``ts``, ``topic``, ``sender``,
``conversation``, ``task``) into a small Struct; the body is skipped. ``--json`` prints
the matching lines as they are stored. A torn or undecodable line is skipped with a
warning on stderr.

The ``--json`` path imports msgspec and the standard library only; ``rich`` and the
message types (which bring in the ``runtime`` package) are imported only to print a
table. So ``python -m orchestrator.log.query --json …`` starts in about 60 ms, most of
it Python's own start and msgspec's import.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import msgspec

from .index import byte_range, read_index
from .layout import HOUR_S, LogFile, list_log_files

if TYPE_CHECKING:
    from runtime.messages import Envelope

__all__ = [
    "LogHead",
    "LogQuery",
    "add_arguments",
    "add_decision_arguments",
    "follow_lines",
    "main",
    "parse_time",
    "query_envelopes",
    "query_lines",
    "run_decisions",
    "run_logs",
]

_CHUNK = 1 << 20
Warn = Callable[[str], None]


def _stderr_warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# -- what a query asks -------------------------------------------------------------------


class LogHead(msgspec.Struct):
    """The envelope fields a filter needs; decoding it skips the body."""

    ts: float
    topic: str
    sender: str
    conversation: str | None = None
    task: str | None = None


class _BodyOnly(msgspec.Struct):
    body: msgspec.Raw


_head_decoder = msgspec.json.Decoder(LogHead)
_body_decoder = msgspec.json.Decoder(_BodyOnly)


@dataclass(frozen=True)
class LogQuery:
    """Filters over the log; every one given must match (topics and senders: any of).

    ``text`` matches the body's string values, case-insensitively. ``needles`` are byte
    strings a matching line must contain (a prefilter for ``where``, which gets the
    line and its head and has the last word).
    """

    since: float | None = None
    until: float | None = None
    topics: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()
    conversation: str | None = None
    task: str | None = None
    text: str | None = None
    newest_first: bool = False
    limit: int | None = None
    needles: tuple[bytes, ...] = ()
    where: Callable[[bytes, LogHead], bool] | None = None


def _json_str(value: str) -> bytes:
    """``value`` as msgspec writes it inside a JSON line, quotes included."""
    return msgspec.json.encode(value)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@dataclass
class _Matcher:
    """A compiled :class:`LogQuery`: a byte prefilter, then the exact checks."""

    query: LogQuery
    warn: Warn
    primary: bytes | None = None
    primary_folded: bool = False  # the primary needle is matched against lowered bytes
    others: list[bytes] = field(default_factory=list)
    folded: bytes | None = None  # the text needle, lowered, when not primary
    bad_lines: int = 0

    def __post_init__(self) -> None:
        q = self.query
        exact: list[bytes] = []
        if q.task is not None:
            exact.append(b'"task":' + _json_str(q.task))
        if q.conversation is not None:
            exact.append(b'"conversation":' + _json_str(q.conversation))
        if len(q.topics) == 1:
            exact.append(b'"topic":' + _json_str(q.topics[0])[:-1])
        if len(q.senders) == 1:
            exact.append(b'"sender":' + _json_str(q.senders[0]))
        exact.extend(q.needles)
        folded: bytes | None = None
        if q.text and q.text.isascii() and _json_str(q.text)[1:-1] == q.text.encode():
            folded = q.text.lower().encode()
        if exact:
            self.primary, self.others, self.folded = exact[0], exact[1:], folded
        elif folded is not None:
            self.primary, self.primary_folded = folded, True
        self._text = q.text.casefold() if q.text else None
        self._topics = q.topics
        self._senders = frozenset(q.senders)

    def lines(self, data: bytes, begin: int = 0, end: int | None = None) -> list[bytes]:
        """The matching lines of ``data[begin:end]``, which holds whole lines only (each
        ends with a newline; ``end`` defaults to the end of ``data``)."""
        check, decode = self._head_matches, _head_decoder.decode
        out: list[bytes] = []
        for line in self._candidates(data, begin, len(data) if end is None else end):
            try:
                head = decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._bad_line(line, exc)
                continue
            if check(line, head):
                out.append(line)
        return out

    def _candidates(self, data: bytes, begin: int, end: int) -> list[bytes]:
        """Lines in ``data[begin:end]`` that hold every needle (all, when there is none)."""
        needle = self.primary
        if needle is None:
            found = data[begin:end].split(b"\n")
            found.pop()  # what follows the last newline: nothing
        else:
            found = []
            hay = data.lower() if self.primary_folded else data
            find, rfind, nl_find = hay.find, data.rfind, data.find
            pos = begin
            while (hit := find(needle, pos, end)) >= 0:
                start = rfind(b"\n", pos, hit) + 1 or pos
                stop = nl_find(b"\n", hit, end)
                found.append(data[start:stop])
                pos = stop + 1
        for other in self.others:
            found = [line for line in found if other in line]
        if self.folded is not None:
            folded = self.folded
            found = [line for line in found if folded in line.lower()]
        return found

    def _bad_line(self, line: bytes, exc: Exception) -> None:
        self.bad_lines += 1
        self.warn(f"skipped a line that is not an envelope ({exc}): {line[:80]!r}")

    def _head_matches(self, line: bytes, head: LogHead) -> bool:
        q = self.query
        if q.since is not None and head.ts < q.since:
            return False
        if q.until is not None and head.ts >= q.until:
            return False
        if self._topics and not head.topic.startswith(self._topics):
            return False
        if self._senders and head.sender not in self._senders:
            return False
        if q.conversation is not None and head.conversation != q.conversation:
            return False
        if q.task is not None and head.task != q.task:
            return False
        if self._text is not None and not self._body_has_text(line):
            return False
        return q.where is None or q.where(line, head)

    def _body_has_text(self, line: bytes) -> bool:
        assert self._text is not None
        body = msgspec.json.decode(_body_decoder.decode(line).body)
        return any(self._text in s.casefold() for s in _strings(body))


# -- reading files -----------------------------------------------------------------------


def _complete_end(f: BinaryIO, size: int) -> int:
    """The offset just past the last newline in the first ``size`` bytes."""
    pos = size
    step = 1 << 16
    while pos > 0:
        step = min(step * 2, pos)
        f.seek(pos - step)
        nl = f.read(step).rfind(b"\n")
        if nl >= 0:
            return pos - step + nl + 1
        pos -= step
    return 0


Batch = list[bytes]  # matching lines of one block, in the order asked for


@dataclass
class _Reader:
    """Scans hour files with one matcher; remembers where each plain file was read to."""

    matcher: _Matcher
    warn: Warn
    ends: dict[Path, int] = field(default_factory=dict)
    listed: set[Path] = field(default_factory=set)  # the files the query picked

    def scan(self, f: LogFile, newest_first: bool, limit: int | None) -> Iterator[Batch]:
        if f.compressed:
            found = self._gzip_lines(f.path, limit if newest_first else None)
            return iter([found[::-1] if newest_first else found])
        return self._plain(f, newest_first, limit)

    def _plain(self, f: LogFile, newest_first: bool, limit: int | None) -> Iterator[Batch]:
        try:
            handle = f.path.open("rb")
        except FileNotFoundError:
            # deleted since it was listed, or compressed: then its lines are in the .gz
            # (unless the query picked that too, for lines that came late)
            gz = f.path.with_name(f.path.name + ".gz")
            if gz not in self.listed and gz.exists():
                yield from self.scan(LogFile(f.hour, True, gz), newest_first, limit)
            return
        with handle:
            size = handle.seek(0, os.SEEK_END)
            end = _complete_end(handle, size)
            self.ends[f.path] = end
            if end < size:
                self.warn(
                    f"skipped an incomplete last line in {f.path.name} "
                    "(a crash mid-write, or a write in progress)"
                )
            start = 0
            q = self.matcher.query
            if (q.since is not None and q.since > f.hour) or (
                q.until is not None and q.until < f.hour + HOUR_S
            ):
                index = read_index(f.index_path, size)
                if index is not None:
                    start, end = byte_range(index, f.hour, q.since, q.until)
            if newest_first:
                yield from self._backward(handle, start, end)
            else:
                yield from self._forward(handle, start, end)

    def _forward(self, handle: BinaryIO, start: int, end: int) -> Iterator[Batch]:
        # a block is cut after its last newline and the next read starts there: the
        # part line is read twice rather than every block copied to join it
        pos, size = start, _CHUNK
        lines = self.matcher.lines
        while pos < end:
            handle.seek(pos)
            block = handle.read(min(size, end - pos))
            if not block:
                break
            cut = block.rfind(b"\n") + 1
            if not cut:  # a line longer than a block
                size *= 2
                continue
            yield lines(block, 0, cut)
            pos += cut

    def _backward(self, handle: BinaryIO, start: int, end: int) -> Iterator[Batch]:
        # ``end`` always sits just after a newline; a block begins after its first one
        pos, size = end, _CHUNK
        while pos > start:
            base = max(start, pos - size)
            handle.seek(base)
            block = handle.read(pos - base)
            first = 0
            if base > start:
                first = block.find(b"\n") + 1
                if not first or first == len(block):  # a line longer than a block
                    size *= 2
                    continue
            found = self.matcher.lines(block, first)
            found.reverse()
            yield found
            pos = base + first

    def _gzip_lines(self, path: Path, keep_last: int | None) -> Batch:
        import gzip  # only compressed hours need it: keep it off the start-up path
        import zlib

        found: deque[bytes] = deque(maxlen=keep_last)
        carry = b""
        try:
            with gzip.open(path, "rb") as gz:
                while block := gz.read(_CHUNK):
                    data = carry + block if carry else block
                    cut = data.rfind(b"\n") + 1
                    carry = data[cut:]
                    if cut:
                        found.extend(self.matcher.lines(data, 0, cut))
        except FileNotFoundError:
            return list(found)
        except (EOFError, OSError, zlib.error) as exc:
            self.warn(f"{path.name} is cut short or damaged ({exc}); read what was intact")
        if carry:
            self.warn(f"skipped an incomplete last line in {path.name}")
        return list(found)


def query_lines(log_dir: Path, query: LogQuery, *, warn: Warn = _stderr_warn) -> Iterator[bytes]:
    """The raw JSON lines (without newline) that match ``query``, in log order or, with
    ``newest_first``, the reverse; at most ``limit``."""
    reader = _Reader(_Matcher(query, warn), warn)
    for batch in _query(reader, log_dir, query):
        yield from batch


def _query(reader: _Reader, log_dir: Path, query: LogQuery) -> Iterator[Batch]:
    left = query.limit
    if left is not None and left <= 0:
        return
    files = list_log_files(log_dir, query.since, query.until)
    reader.listed.update(f.path for f in files)
    if query.newest_first:
        files.reverse()
    for f in files:
        for batch in reader.scan(f, query.newest_first, left):
            if left is not None:
                batch = batch[:left]
                left -= len(batch)
            if batch:
                yield batch
            if left == 0:
                return


def follow_lines(
    log_dir: Path,
    query: LogQuery,
    *,
    poll_s: float = 0.2,
    follow_for: float | None = None,
    stop: Callable[[], bool] = lambda: False,
    warn: Warn = _stderr_warn,
) -> Iterator[bytes]:
    """Like ``tail -f``: the matching lines so far (the last ``limit`` of them when a
    limit is set), oldest first, then each new matching line as it is written, across
    hourly rotation, until ``stop()`` is true or ``follow_for`` seconds have passed.

    ``until`` is ignored. New lines are polled every ``poll_s``; the newest hour file
    and the one before it are watched, so a line that arrives late for the last hour is
    still seen.
    """
    for line in _follow(log_dir, query, poll_s, follow_for, stop, warn):
        if line is not None:
            yield line


def _follow(
    log_dir: Path,
    query: LogQuery,
    poll_s: float,
    follow_for: float | None,
    stop: Callable[[], bool],
    warn: Warn,
) -> Iterator[bytes | None]:
    """:func:`follow_lines`, yielding None each time it has caught up and will wait."""
    query = replace(query, until=None)
    reader = _Reader(_Matcher(query, warn), warn)
    # where following starts in the files the history may not read (a limit met early)
    offsets = {path: _file_end(path) for path in _followed(log_dir)}
    if query.limit is not None:
        history = [x for b in _query(reader, log_dir, replace(query, newest_first=True)) for x in b]
        yield from reversed(history)
    else:
        for batch in _query(reader, log_dir, replace(query, newest_first=False)):
            yield from batch
    matcher = reader.matcher
    offsets.update(reader.ends)
    deadline = None if follow_for is None else time.monotonic() + follow_for
    while True:
        yield None
        if stop() or (deadline is not None and time.monotonic() >= deadline):
            return
        grew = False
        for path in _followed(log_dir):
            offset = offsets.get(path, 0)
            try:
                with path.open("rb") as handle:
                    size = handle.seek(0, os.SEEK_END)
                    if size <= offset:
                        continue
                    handle.seek(offset)
                    data = handle.read(size - offset)
            except FileNotFoundError:
                continue
            cut = data.rfind(b"\n") + 1
            if cut:
                offsets[path] = offset + cut
                grew = True
                yield from matcher.lines(data, 0, cut)
        if not grew:
            time.sleep(poll_s)


def _followed(log_dir: Path) -> list[Path]:
    """The files a follower watches: the newest hour and the one before (late lines)."""
    return [f.path for f in list_log_files(log_dir) if not f.compressed][-2:]


def _file_end(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return _complete_end(handle, handle.seek(0, os.SEEK_END))
    except FileNotFoundError:
        return 0


def query_envelopes(
    log_dir: Path, query: LogQuery, *, warn: Warn = _stderr_warn
) -> Iterator[Envelope]:
    """Like :func:`query_lines`, decoded into envelopes."""
    decode = _envelope_decoder().decode
    for line in query_lines(log_dir, query, warn=warn):
        yield decode(line)


def _envelope_decoder() -> msgspec.json.Decoder[Envelope]:
    from runtime.messages import Envelope

    return msgspec.json.Decoder(Envelope)


# -- times -------------------------------------------------------------------------------

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_RELATIVE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_time(text: str, now: float | None = None) -> float:
    """A unix time from ``10m`` / ``1h30m`` / ``2d`` (that long ago), ``now``, an ISO
    time (``2025-01-31T14:00``, UTC unless it carries an offset) or unix seconds."""
    now = time.time() if now is None else now
    value = text.strip()
    if value == "now":
        return now
    if _RELATIVE.fullmatch(value):
        return now - sum(float(n) * _UNITS[u] for n, u in _PART.findall(value))
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"cannot read the time {text!r}: use a span ago like 10m, 2h or 1d, "
            "an ISO time like 2025-01-31T14:00 (UTC unless it has an offset), or unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _format_ts(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# -- output ------------------------------------------------------------------------------


def summarize(envelope: Envelope) -> str:
    """One line about an envelope's body, for people."""
    from runtime import messages as m

    body = envelope.body
    match body:
        case m.UserTurn(text=text):
            return text
        case m.Chunk(seq=seq, delta=delta, final=final, finish=finish):
            end = f" [final {finish}]" if final else ""
            return f"#{seq} {delta!r}{end}"
        case m.TaskAssign(kind=kind, text=text, attempt=attempt):
            return f"{kind} (attempt {attempt}): {text}"
        case m.TaskUpdate(state=state, message=message, progress=progress):
            pct = f" {progress:.0%}" if progress is not None else ""
            return f"{state}{pct} {message}".rstrip()
        case m.Cue(speak_now=speak_now, priority=priority, reason=reason):
            return f"{'speak' if speak_now else 'hold'} p{priority}: {reason}"
        case m.Decision(action=action, reason=reason):
            return f"{action}: {reason}"
        case m.Heartbeat(state=state, task=task, load=load):
            return f"{state} load={load:.2f}" + (f" task={task}" if task else "")
        case m.EngineStats(tokens_per_s=tps, cache_fill=fill, sessions=sessions):
            return f"{tps:.1f} tok/s, cache {fill:.0%}, {sessions} sessions"
        case m.Fault(kind=kind, message=message):
            return f"{kind}: {message}"
        case m.Rollout(action=action, percent=percent, reason=reason):
            figures = "; ".join(
                f"{name} {f.errors}/{f.samples} errors, first token "
                + ("-" if f.first_token_s is None else f"{f.first_token_s:.2f} s")
                for name, f in (
                    ("candidate", body.candidate_figures),
                    ("baseline", body.baseline_figures),
                )
            )
            return f"canary {action} {percent:g}% ({figures}) {reason}".rstrip()
    fields = msgspec.structs.asdict(body)
    return f"{type(body).__name__} " + " ".join(f"{k}={v}" for k, v in fields.items() if v)


_LOG_COLUMNS = (
    ("time", 24),
    ("topic", 20),
    ("sender", 10),
    ("conversation", 12),
    ("task", 12),
    ("body", 0),
)


class _Output:
    """Prints rows: a rich table on a terminal, aligned plain text otherwise, or JSON."""

    def __init__(
        self,
        columns: Sequence[tuple[str, int]],
        row: Callable[[bytes], list[str] | None],
        *,
        as_json: bool,
    ) -> None:
        self.columns = list(columns)  # the last one, width 0, takes the rest
        self.row = row
        self.as_json = as_json
        self.rich = not as_json and sys.stdout.isatty()
        self._out = sys.stdout.buffer
        self._pending: list[bytes] = []
        self._rows: list[list[str]] = []
        self._header_done = False
        self._console: Any = None

    def line(self, raw: bytes) -> None:
        if self.as_json:
            self._pending.append(raw)
            if len(self._pending) >= 4096:
                self.flush()
        else:
            row = self.row(raw)
            if row is not None:
                self._rows.append(row)
            if len(self._rows) >= 200:
                self.flush()

    def add(self, row: list[str]) -> None:
        """A row made by the caller (tables not read line by line from the log)."""
        self._rows.append(row)
        if len(self._rows) >= 200:
            self.flush()

    def lines(self, batch: list[bytes]) -> None:
        if not self.as_json:
            for raw in batch:
                self.line(raw)
            return
        self.flush()
        batch.append(b"")
        self._out.write(b"\n".join(batch))
        batch.pop()

    def flush(self) -> None:
        if self._pending:
            self._pending.append(b"")
            self._out.write(b"\n".join(self._pending))
            self._pending.clear()
        if self._rows:
            if self.rich:
                self._print_rich()
            else:
                self._print_plain()
            self._rows.clear()
        sys.stdout.flush()

    def _print_plain(self) -> None:
        lines = []
        if not self._header_done:
            self._header_done = True
            lines.append(self._plain_row([name.upper() for name, _ in self.columns]))
        lines.extend(self._plain_row(row) for row in self._rows)
        self._out.write(("\n".join(lines) + "\n").encode())

    def _plain_row(self, row: Sequence[str]) -> str:
        cells = [cell.ljust(width) for cell, (_, width) in zip(row, self.columns, strict=True)]
        return "  ".join(cells).rstrip()

    def _print_rich(self) -> None:
        from rich.console import Console
        from rich.table import Table

        if self._console is None:
            self._console = Console()
        table = Table(show_header=not self._header_done, box=None, pad_edge=False)
        self._header_done = True
        styles = ["dim", "cyan", "magenta", "green", "yellow", ""]
        for (name, width), style in zip(self.columns, styles, strict=False):
            if width:
                table.add_column(name, width=width, no_wrap=True, overflow="ellipsis", style=style)
            else:
                table.add_column(name, no_wrap=True, overflow="ellipsis", ratio=1)
        for row in self._rows:
            table.add_row(*row)
        self._console.print(table, soft_wrap=False)


def _log_row(envelope: Envelope) -> list[str]:
    return [
        _format_ts(envelope.ts),
        envelope.topic,
        envelope.sender,
        envelope.conversation or "",
        envelope.task or "",
        summarize(envelope).replace("\n", " "),
    ]


# -- the CLI -----------------------------------------------------------------------------


def _logs_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    # what runtime.paths.DataDir.at(data_dir).logs gives, without importing structlog
    # (150 ms of start-up the --json path does not need)
    root = (
        Path(data_dir) if data_dir is not None else Path(os.environ.get("CHORUS_DATA_DIR", "data"))
    )
    return root / "logs"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", metavar="WHEN", help="from this time: 10m, 2h, 1d, ISO, unix")
    parser.add_argument("--until", metavar="WHEN", help="before this time (same forms)")
    parser.add_argument("--conversation", "-c", metavar="ID", help="only this conversation")
    parser.add_argument("--grep", metavar="TEXT", help="body text contains TEXT (any case)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--newest", dest="oldest", action="store_false", help="newest first (the default)"
    )
    order.add_argument("--oldest", dest="oldest", action="store_true", help="oldest first")
    parser.set_defaults(oldest=False)
    parser.add_argument("--limit", "-n", type=int, metavar="N", help="at most N lines")
    parser.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new lines (Ctrl-C stops)"
    )
    parser.add_argument(
        "--follow-for", type=float, metavar="S", help="with --follow: stop after S seconds"
    )
    parser.add_argument("--json", action="store_true", help="JSON lines, as stored")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m runtime logs`` (``data_dir`` is the caller's)."""
    parser.add_argument(
        "--topic", "-t", action="append", default=[], metavar="PREFIX", help="topic prefix"
    )
    parser.add_argument(
        "--sender", "-s", action="append", default=[], metavar="NAME", help="sent by NAME"
    )
    parser.add_argument("--task", metavar="ID", help="only this task")
    _add_common(parser)


def add_decision_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m runtime decisions``."""
    from typing import get_args, get_type_hints

    from runtime.messages import Decision

    parser.add_argument(
        "--action",
        "-a",
        action="append",
        default=[],
        choices=get_args(get_type_hints(Decision)["action"]),
        help="only this action (repeatable)",
    )
    parser.add_argument(
        "--sender", "-s", action="append", default=[], metavar="NAME", help="sent by NAME"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="per cue, the narrator's and the shadow narrator's streams side by side",
    )
    _add_common(parser)


def _base_query(args: argparse.Namespace, now: float) -> LogQuery:
    since = parse_time(args.since, now) if args.since else None
    until = parse_time(args.until, now) if args.until else None
    if args.follow and until is not None:
        raise ValueError("--until and --follow do not mix: following has no end")
    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit takes a count of 0 or more")
    return LogQuery(
        since=since,
        until=until,
        senders=tuple(args.sender),
        conversation=args.conversation,
        text=args.grep,
        newest_first=not args.oldest,
        limit=args.limit,
    )


def _run(
    args: argparse.Namespace,
    query: LogQuery,
    columns: Sequence[tuple[str, int]],
    row: Callable[[Envelope], list[str]],
) -> int:
    log_dir = _logs_dir(getattr(args, "data_dir", None))
    decoder = None if args.json else _envelope_decoder()

    def table_row(raw: bytes) -> list[str] | None:
        assert decoder is not None
        try:
            return row(decoder.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            _stderr_warn(f"skipped a line whose body does not decode ({exc}): {raw[:80]!r}")
            return None

    out = _Output(columns, table_row, as_json=args.json)
    try:
        if args.follow:
            for raw in _follow(log_dir, query, 0.2, args.follow_for, lambda: False, _stderr_warn):
                if raw is None:
                    out.flush()  # caught up: show what there is before waiting
                else:
                    out.line(raw)
        else:
            reader = _Reader(_Matcher(query, _stderr_warn), _stderr_warn)
            for batch in _query(reader, log_dir, query):
                out.lines(batch)
        out.flush()
    except KeyboardInterrupt:
        out.flush()
        return 0
    except BrokenPipeError:
        # the reader (head, less) went away: stop quietly, and keep Python's exit quiet too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0


def run_logs(args: argparse.Namespace) -> int:
    """``python -m runtime logs``: print the envelopes that match; returns an exit code."""
    try:
        query = replace(_base_query(args, time.time()), topics=tuple(args.topic), task=args.task)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _run(args, query, _LOG_COLUMNS, _log_row)


def _decision_row(envelope: Envelope) -> list[str]:
    from runtime.messages import Decision

    body = envelope.body
    action, reason, cue = ("", summarize(envelope), "")
    if isinstance(body, Decision):
        action, reason, cue = body.action, body.reason, body.cue
    return [
        _format_ts(envelope.ts),
        envelope.sender,
        action,
        envelope.conversation or "",
        cue,
        reason.replace("\n", " "),
    ]


_DECISION_COLUMNS = (
    ("time", 24),
    ("sender", 10),
    ("action", 9),
    ("conversation", 12),
    ("cue", 12),
    ("reason", 0),
)


class _DecisionBody(msgspec.Struct):
    action: str = ""


class _DecisionLine(msgspec.Struct):
    body: _DecisionBody


_decision_decoder = msgspec.json.Decoder(_DecisionLine)


def run_decisions(args: argparse.Namespace) -> int:
    """``python -m runtime decisions``: why the narrator spoke or held, from the log."""
    if getattr(args, "compare", False):
        from .compare import run_compare

        return run_compare(args)
    try:
        query = _base_query(args, time.time())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    actions = frozenset(args.action)
    needles: tuple[bytes, ...] = ()
    where: Callable[[bytes, LogHead], bool] | None = None
    if actions:
        if len(actions) == 1:
            needles = (b'"action":' + _json_str(next(iter(actions))),)

        def where(line: bytes, head: LogHead) -> bool:
            return _decision_decoder.decode(line).body.action in actions

    query = replace(query, topics=("narrator.decision",), needles=needles, where=where)
    return _run(args, query, _DECISION_COLUMNS, _decision_row)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestrator.log.query``: the ``logs`` command on its own."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.log.query", description="Query the Chorus bus log."
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="the data directory (default $CHORUS_DATA_DIR or ./data)"
    )
    add_arguments(parser)
    return run_logs(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
