"""``python -m runtime decisions --compare``: the narrator and its shadow, cue by cue.

For every ``narrator.cue`` in range, the real narrator's stream (``user.out``) and the
shadow's (``shadow.user.out``), joined by the chunk's ``cue`` field, each with the time
from the cue to its first words and to its final chunk, its length in characters and how
it ended. Everything is read from the bus log; a redacted log (``--log-redact``) still
gives lengths, from the ``len=N`` of each redacted delta.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import msgspec

from .query import (
    LogQuery,
    Warn,
    _base_query,
    _format_ts,
    _logs_dir,
    _Output,
    _stderr_warn,
    query_envelopes,
)
from .writer import REDACTED

VOICES = {"narrator": "user.out", "narrator-shadow": "shadow.user.out"}


class Stream(msgspec.Struct, kw_only=True):
    """One voice's utterance about one cue (times from the cue, in seconds)."""

    first_s: float | None = None  # to the first chunk with words
    total_s: float | None = None  # to the final chunk (None: it never ended in range)
    chars: int = 0
    finish: str = ""


class Row(msgspec.Struct, kw_only=True):
    """One cue, and what each voice said about it (None: that voice said nothing)."""

    cue: str
    ts: float
    conversation: str
    kind: str
    narrator: Stream | None = None
    shadow: Stream | None = None


def _chars(delta: str) -> int:
    redacted = REDACTED.fullmatch(delta)
    return int(redacted.group(1)) if redacted else len(delta)


def compare(log_dir: Path, query: LogQuery, *, warn: Warn = _stderr_warn) -> list[Row]:
    """The rows for the cues that ``query`` selects (its topics, order and limit are
    replaced: cues come oldest first; cut the list yourself)."""
    q = replace(
        query,
        topics=("narrator.cue", *VOICES.values()),
        newest_first=False,
        limit=None,
        senders=(),
    )
    from runtime import messages as m

    rows: dict[str, Row] = {}
    streams: dict[tuple[str, str], Stream] = {}
    said: set[tuple[str, str, int]] = set()  # a chunk said again after a broker restart counts once
    for env in query_envelopes(log_dir, q, warn=warn):
        body = env.body
        if isinstance(body, m.Cue):
            if env.id not in rows:  # re-sends of a cue carry the same id
                rows[env.id] = Row(
                    cue=env.id, ts=env.ts, conversation=env.conversation or "", kind=body.kind
                )
            continue
        if not isinstance(body, m.Chunk) or VOICES.get(env.sender) != env.topic:
            continue
        row = rows.get(body.cue)
        if row is None or (env.sender, body.stream, body.seq) in said:
            continue  # a stream whose cue is out of range (or from before chunks named it)
        said.add((env.sender, body.stream, body.seq))
        stream = streams.get((body.cue, env.sender))
        if stream is None:
            stream = streams[(body.cue, env.sender)] = Stream()
            if env.sender == "narrator":
                row.narrator = stream
            else:
                row.shadow = stream
        if body.delta and stream.first_s is None:
            stream.first_s = round(env.ts - row.ts, 4)
        stream.chars += _chars(body.delta)
        if body.final:
            stream.total_s = round(env.ts - row.ts, 4)
            stream.finish = body.finish
    return sorted(rows.values(), key=lambda r: r.ts)


def _median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 4) if known else None


def summary(rows: list[Row]) -> dict[str, object]:
    """Medians and counts per voice over ``rows``."""
    out: dict[str, object] = {"cues": len(rows)}
    for name in ("narrator", "shadow"):
        said = [s for r in rows if (s := getattr(r, name)) is not None]
        out[name] = {
            "streams": len(said),
            "errors": sum(1 for s in said if s.finish == "error"),
            "unfinished": sum(1 for s in said if s.total_s is None),
            "first_s_median": _median(s.first_s for s in said),
            "total_s_median": _median(s.total_s for s in said),
            "chars_median": _median(float(s.chars) for s in said),
        }
    return out


_COLUMNS = (
    ("time", 24),
    ("conversation", 12),
    ("kind", 8),
    ("narrator first/total", 20),
    ("len", 6),
    ("end", 11),
    ("shadow first/total", 20),
    ("len", 6),
    ("end", 0),
)


def _cells(stream: Stream | None) -> list[str]:
    if stream is None:
        return ["—", "", ""]

    def seconds(value: float | None) -> str:
        return "…" if value is None else f"{value:.2f}s"

    return [
        f"{seconds(stream.first_s)} / {seconds(stream.total_s)}",
        str(stream.chars),
        stream.finish or "unfinished",
    ]


def run_compare(args: argparse.Namespace) -> int:
    """``python -m runtime decisions --compare``; returns an exit code."""
    if args.follow:
        print("error: --compare reads what is logged; it does not --follow", file=sys.stderr)
        return 2
    try:
        query = _base_query(args, time.time())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = compare(_logs_dir(getattr(args, "data_dir", None)), query)
    if not args.oldest:
        rows.reverse()
    if args.limit is not None:
        rows = rows[: args.limit]
    if args.json:
        out = sys.stdout.buffer
        for row in rows:
            out.write(msgspec.json.encode(row) + b"\n")
        out.write(msgspec.json.encode({"summary": summary(rows)}) + b"\n")
        out.flush()
        return 0
    table = _Output(_COLUMNS, lambda raw: None, as_json=False)
    for row in rows:
        table.add(
            [
                _format_ts(row.ts),
                row.conversation,
                row.kind,
                *_cells(row.narrator),
                *_cells(row.shadow),
            ]
        )
    table.flush()
    figures = summary(rows)
    for name in ("narrator", "shadow"):
        f = figures[name]
        assert isinstance(f, dict)
        print(
            f"{name}: {f['streams']} of {figures['cues']} cues, {f['errors']} errors, "
            f"median first words {f['first_s_median']} s, total {f['total_s_median']} s, "
            f"length {f['chars_median']} chars"
        )
    return 0
