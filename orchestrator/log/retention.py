"""Keeping the bus log within bounds: retention by age and size, gzip of closed hours,
and the minute index beside closed plain hours.

The writer runs :func:`maintain` at start and then hourly in its own thread; each step
is also callable alone. None of them ever touches a file named in ``keep`` (the file
being written and the current hour's), and all of them go oldest file first. ``keep``
may be a set the writer changes as it goes: each file is checked under ``lock``, the
lock the writer takes to open a file, so a late line never lands in a file on its way
out.
"""

from __future__ import annotations

import gzip
import os
import shutil
import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog

from runtime.paths import write_atomic

from .index import build_index, read_index
from .layout import HOUR_S, LogFile, list_log_files

log = structlog.get_logger("log_retention")

DAY_S = 86400
MIB = 1 << 20


@dataclass
class MaintenanceReport:
    """What one maintenance pass did."""

    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    compressed: list[str] = field(default_factory=list)
    indexed: list[str] = field(default_factory=list)
    total_bytes: int = 0  # what the log holds after the pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _footprint(f: LogFile) -> int:
    return _size(f.path) + (0 if f.compressed else _size(f.index_path))


def _remove(f: LogFile) -> int:
    freed = _footprint(f)
    f.path.unlink(missing_ok=True)
    if not f.compressed:
        f.index_path.unlink(missing_ok=True)
    return freed


def apply_retention(
    log_dir: Path,
    *,
    retain_days: float = 14,
    retain_mb: float = 1024,
    now: float | None = None,
    keep: Collection[str] = (),
    lock: AbstractContextManager[Any] | None = None,
    report: MaintenanceReport | None = None,
) -> MaintenanceReport:
    """Delete hour files older than ``retain_days``, then the oldest files until the log
    holds at most ``retain_mb`` MiB. Files named in ``keep`` are never deleted, even when
    that leaves the log over its size."""
    now = time.time() if now is None else now
    report = report if report is not None else MaintenanceReport()
    guard = lock if lock is not None else nullcontext()
    cutoff = now - retain_days * DAY_S
    kept: list[LogFile] = []
    for f in list_log_files(log_dir):
        with guard:
            if f.hour + HOUR_S <= cutoff and f.path.name not in keep:
                report.freed_bytes += _remove(f)
                report.deleted.append(f.path.name)
                continue
        kept.append(f)
    sizes = [_footprint(f) for f in kept]
    total = sum(sizes)
    limit = retain_mb * MIB
    for f, size in zip(kept, sizes, strict=True):
        if total <= limit:
            break
        with guard:
            if f.path.name in keep:
                continue
            report.freed_bytes += _remove(f)
        report.deleted.append(f.path.name)
        total -= size
    if total > limit:
        log.warning(
            "log_over_size_limit",
            total_mb=round(total / MIB, 1),
            retain_mb=retain_mb,
            reason="only the file being written is left",
        )
    report.total_bytes = total
    if report.deleted:
        log.info("log_retention", deleted=len(report.deleted), freed_bytes=report.freed_bytes)
    return report


def _closed(f: LogFile, now: float, after_s: float, keep: Collection[str]) -> bool:
    """A plain hour that ended at least ``after_s`` ago and is not being written."""
    return not f.compressed and f.path.name not in keep and f.hour + HOUR_S + after_s <= now


def compress_closed(
    log_dir: Path,
    *,
    now: float | None = None,
    after_s: float = 300,
    keep: Collection[str] = (),
    stop: Callable[[], bool] = lambda: False,
    lock: AbstractContextManager[Any] | None = None,
    report: MaintenanceReport | None = None,
) -> MaintenanceReport:
    """gzip every plain hour that ended ``after_s`` ago or more, oldest first.

    The gzip file is written beside, fsynced and renamed into place before the plain
    file goes, so a crash leaves one complete copy at least. Lines that arrive for an
    hour already compressed land in a plain file again; the next pass appends them to
    the ``.gz`` as another gzip member, which readers see as one stream.
    """
    now = time.time() if now is None else now
    report = report if report is not None else MaintenanceReport()
    guard = lock if lock is not None else nullcontext()
    for f in list_log_files(log_dir):
        if stop():
            break
        with guard:
            if not _closed(f, now, after_s, keep) or not f.path.exists():
                continue
            _gzip_into(f.path, f.path.with_name(f.path.name + ".gz"))
            f.path.unlink()
            f.index_path.unlink(missing_ok=True)
        report.compressed.append(f.path.name)
    if report.compressed:
        log.info("log_compressed", files=len(report.compressed))
    return report


def _gzip_into(src_path: Path, target: Path) -> None:
    tmp = target.with_name("." + target.name + ".tmp")
    if target.exists():
        shutil.copyfile(target, tmp)  # keep the members already there
    else:
        tmp.unlink(missing_ok=True)  # a leftover from a crash mid-compression
    with src_path.open("rb") as src, tmp.open("ab") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, target)


def index_closed(
    log_dir: Path,
    *,
    now: float | None = None,
    since: float | None = None,
    keep: Collection[str] = (),
    stop: Callable[[], bool] = lambda: False,
    report: MaintenanceReport | None = None,
) -> MaintenanceReport:
    """Write a minute index beside every closed plain hour that lacks a current one
    (hours that ended before ``since`` are left alone: retention is about to delete them)."""
    now = time.time() if now is None else now
    report = report if report is not None else MaintenanceReport()
    for f in list_log_files(log_dir, since=since):
        if stop():
            break
        if not _closed(f, now, 0, keep):
            continue
        size = _size(f.path)
        if read_index(f.index_path, size) is not None:
            continue
        try:
            index = build_index(f.path, f.hour)
        except FileNotFoundError:  # deleted or compressed meanwhile: nothing to index
            continue
        write_atomic(f.index_path, msgspec.json.encode(index))
        report.indexed.append(f.path.name)
        if index.unreadable:
            log.warning(
                "log_lines_unreadable",
                file=f.path.name,
                lines=index.unreadable,
                why="lines of the bus log no longer decode; readers skip them",
            )
    return report


def maintain(
    log_dir: Path,
    *,
    retain_days: float = 14,
    retain_mb: float = 1024,
    compress: bool = False,
    compress_after_s: float = 300,
    index: bool = True,
    now: float | None = None,
    keep: Collection[str] = (),
    stop: Callable[[], bool] = lambda: False,
    lock: AbstractContextManager[Any] | None = None,
) -> MaintenanceReport:
    """One pass: compress closed hours, index closed plain hours, then apply retention
    (last, so the size it keeps to counts the new indexes too)."""
    now = time.time() if now is None else now
    report = MaintenanceReport()
    if compress:
        compress_closed(
            log_dir,
            now=now,
            after_s=compress_after_s,
            keep=keep,
            stop=stop,
            lock=lock,
            report=report,
        )
    if index:
        since = now - retain_days * DAY_S
        index_closed(log_dir, now=now, since=since, keep=keep, stop=stop, report=report)
    apply_retention(
        log_dir,
        retain_days=retain_days,
        retain_mb=retain_mb,
        now=now,
        keep=keep,
        lock=lock,
        report=report,
    )
    return report
