"""Process logs through structlog: a console renderer when a person watches, JSON lines
to ``data/logs/process/<process>.log`` otherwise.

A process log is rotated by size: past ``MAX_BYTES`` it becomes ``<process>.log.1``
(the older ones shift to ``.2`` … ``.BACKUPS``, the oldest is dropped), so a service
that runs for months keeps at most ``(BACKUPS + 1) × MAX_BYTES`` per process.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO, cast

import structlog

MAX_BYTES = 16 << 20
BACKUPS = 3

_log_file: _LogFile | None = None


def configure(
    process: str,
    *,
    log_dir: Path | None = None,
    debug: bool = False,
    console: bool | None = None,
    max_bytes: int = MAX_BYTES,
) -> None:
    """Set up structlog for this process.

    ``console=None`` picks the console renderer when stderr is a terminal. With a
    ``log_dir`` and no console, events go as JSON lines to ``<log_dir>/<process>.log``.
    """
    if console is None:
        console = sys.stderr.isatty()
    level = logging.DEBUG if debug else logging.INFO
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    global _log_file
    if _log_file is not None:  # configured again: the file of the last setup is done with
        _log_file.close()
        _log_file = None
    out: TextIO
    if console or log_dir is None:
        out = sys.stderr
        processors.append(
            structlog.dev.ConsoleRenderer(
                exception_formatter=structlog.dev.plain_traceback if debug else _one_line_exception,
            )
        )
    else:
        log_dir.mkdir(parents=True, exist_ok=True)
        _log_file = _LogFile(log_dir / f"{process}.log", max_bytes)
        out = cast(TextIO, _log_file)  # it has what print() uses
        if debug:
            processors.append(structlog.processors.format_exc_info)
        processors.append(structlog.processors.JSONRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(process=process)


class _LogFile:
    """A process log, rotated past ``max_bytes``, whose write errors are dropped: a
    process must go on serving when its own log cannot be written (a full disk), as the
    logging module's handlers do."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max_bytes
        self._file = path.open("a", buffering=1, encoding="utf-8")
        self._size = self._file.tell()

    def write(self, text: str) -> int:
        try:
            written = self._file.write(text)
            self._size += written  # characters: bytes for the ASCII JSON lines mostly are
            if self._size >= self.max_bytes and text.endswith("\n"):  # between lines only
                self._rotate()
        except OSError:
            return 0
        return written

    def close(self) -> None:
        self._file.close()

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError:
            pass

    def _rotate(self) -> None:
        self._size = 0  # if a step fails, the next try is another max_bytes away
        # renamed while open (the descriptor follows the file), then the new one opened:
        # whichever step fails, the file in hand still takes the lines
        for n in range(BACKUPS - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        old, self._file = self._file, self.path.open("a", buffering=1, encoding="utf-8")
        old.close()


def _one_line_exception(sio: TextIO, exc_info: Any) -> None:
    """Without --debug, an exception is one line: its type and message."""
    _, exc, _ = exc_info
    sio.write(f"\n{type(exc).__name__}: {exc} (run with --debug for the traceback)")
