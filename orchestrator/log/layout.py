"""Where the bus log lives on disk: one file per UTC hour, named by the hour.

``YYYY-MM-DDTHH.jsonl`` is the hour being written (or a closed hour kept plain),
``YYYY-MM-DDTHH.jsonl.gz`` a closed hour compressed, ``YYYY-MM-DDTHH.idx`` the minute
index beside a closed plain file. A file holds exactly the envelopes whose ``ts`` falls
in its hour, so a reader can skip files outside a time range by name alone.

This module imports nothing heavy: the query CLI starts with it on its hot path.
"""

from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HOUR_S = 3600
PLAIN_SUFFIX = ".jsonl"
GZIP_SUFFIX = ".jsonl.gz"
INDEX_SUFFIX = ".idx"

_NAME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2})\.jsonl(\.gz)?$")


def hour_file_name(ts: float) -> str:
    """``YYYY-MM-DDTHH.jsonl`` (UTC) for a unix time."""
    return _hour_name(int(ts // 3600))


@functools.lru_cache(maxsize=64)
def _hour_name(hour: int) -> str:  # the writer asks for every envelope: once per hour will do
    return time.strftime("%Y-%m-%dT%H.jsonl", time.gmtime(hour * 3600))


def hour_of(ts: float) -> float:
    """The start of the UTC hour that holds ``ts``."""
    return float(int(ts // HOUR_S) * HOUR_S)


@dataclass(frozen=True)
class LogFile:
    """One hour file of the bus log; sorts by hour, a compressed part before a plain one."""

    hour: float
    compressed: bool
    path: Path

    @property
    def stem(self) -> str:
        """``YYYY-MM-DDTHH``, the hour's name without a suffix."""
        return self.path.name.split(".", 1)[0]

    @property
    def index_path(self) -> Path:
        """Where the minute index of this hour lives (only plain files get one)."""
        return self.path.with_name(self.stem + INDEX_SUFFIX)


def parse_name(path: Path) -> LogFile | None:
    """The :class:`LogFile` for a path, or None when the name is not an hour file."""
    match = _NAME.match(path.name)
    if match is None:
        return None
    y, mo, d, h, gz = match.groups()
    hour = datetime(int(y), int(mo), int(d), int(h), tzinfo=UTC).timestamp()
    return LogFile(hour=hour, compressed=gz is not None, path=path)


def list_log_files(
    log_dir: Path, since: float | None = None, until: float | None = None
) -> list[LogFile]:
    """Hour files that may hold envelopes with ``since <= ts < until``, oldest first.

    Selection is by name only; no file is opened. Within one hour the compressed part
    (written first) comes before a plain part holding later, late-arriving lines.
    """
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return []
    files: list[LogFile] = []
    for name in names:
        if not name.endswith((PLAIN_SUFFIX, GZIP_SUFFIX)):
            continue
        found = parse_name(log_dir / name)
        if found is None:
            continue
        if since is not None and found.hour + HOUR_S <= since:
            continue
        if until is not None and found.hour >= until:
            continue
        files.append(found)
    files.sort(key=lambda f: (f.hour, not f.compressed))
    return files
