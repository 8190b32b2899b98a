"""A minute index beside each closed hour file, so a query that starts or ends inside an
hour reads only the bytes it needs.

``YYYY-MM-DDTHH.idx`` is JSON: the file size it describes and, per minute of the hour,
where the first line at or after that minute starts and where the last line before the
end of that minute ends. Lines are in arrival order, not strictly by ``ts``; both arrays
are built over every line (a running minimum from the end, a running maximum from the
start), so a late line never falls outside its range. An index whose size differs from
the file's (a late line was appended after indexing) is ignored until rebuilt. Building
it reads every line, so it is also where lines damaged on disk are first counted
(``unreadable``; the writer's maintenance logs ``log_lines_unreadable``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

from .layout import HOUR_S

MINUTES = HOUR_S // 60
INDEX_VERSION = 1


class HourIndex(msgspec.Struct, frozen=True, kw_only=True):
    """Byte ranges of one hour file, minute by minute."""

    version: int = INDEX_VERSION
    size: int  # the file size this index describes
    starts: list[int]  # starts[m]: no line with ts >= hour + 60*m starts before this
    ends: list[int]  # ends[m]: no line with ts < hour + 60*(m+1) ends after this
    unreadable: int = 0  # whole lines that did not decode (bytes damaged on disk)


class _Ts(msgspec.Struct):
    ts: float


_ts_decoder = msgspec.json.Decoder(_Ts)


def iter_line_spans(f: BinaryIO, size: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for every complete line in the first ``size`` bytes of ``f``."""
    f.seek(0)
    offset = 0
    # line by line through the file's small buffer, not in large blocks: a pass over an
    # hour file then leaves the process no larger than it found it
    while offset < size:
        line = f.readline(size - offset)
        if not line.endswith(b"\n"):  # a torn tail, or the end of the first ``size`` bytes
            return
        yield offset, line[:-1]
        offset += len(line)


def build_index(path: Path, hour: float) -> HourIndex:
    """Scan one plain hour file and index it (lines that do not decode are left out)."""
    first = [-1] * MINUTES
    last = [0] * MINUTES
    unreadable = 0
    with path.open("rb") as f:
        size = f.seek(0, 2)
        for offset, line in iter_line_spans(f, size):
            try:
                ts = _ts_decoder.decode(line).ts
            except (msgspec.DecodeError, msgspec.ValidationError):
                unreadable += 1
                continue
            minute = min(MINUTES - 1, max(0, int((ts - hour) // 60)))
            if first[minute] < 0 or offset < first[minute]:
                first[minute] = offset
            end = offset + len(line) + 1
            if end > last[minute]:
                last[minute] = end
    starts = [size] * MINUTES
    low = size
    for minute in range(MINUTES - 1, -1, -1):
        if 0 <= first[minute] < low:
            low = first[minute]
        starts[minute] = low
    ends = [0] * MINUTES
    high = 0
    for minute in range(MINUTES):
        high = max(high, last[minute])
        ends[minute] = high
    return HourIndex(size=size, starts=starts, ends=ends, unreadable=unreadable)


def read_index(path: Path, size: int) -> HourIndex | None:
    """The index at ``path`` if it describes a file of ``size`` bytes, else None."""
    try:
        index = msgspec.json.decode(path.read_bytes(), type=HourIndex)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    if index.version != INDEX_VERSION or index.size != size or len(index.starts) != MINUTES:
        return None
    return index


def byte_range(
    index: HourIndex, hour: float, since: float | None, until: float | None
) -> tuple[int, int]:
    """``(start, end)`` offsets that hold every line of the hour with ``since <= ts < until``."""
    start = 0
    if since is not None and since > hour:
        start = index.starts[min(MINUTES - 1, int((since - hour) // 60))]
    end = index.size
    if until is not None and until < hour + HOUR_S:
        minute = -int(-(until - hour) // 60) - 1  # the last minute that starts before until
        end = index.ends[minute] if minute >= 0 else 0
    return start, max(start, end)
