"""Process logs through structlog: a console renderer when a person watches, JSON lines
to ``data/logs/process/<process>.log`` otherwise."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, TextIO, cast

import structlog


def configure(
    process: str,
    *,
    log_dir: Path | None = None,
    debug: bool = False,
    console: bool | None = None,
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
        file = (log_dir / f"{process}.log").open("a", buffering=1, encoding="utf-8")
        out = cast(TextIO, _BestEffort(file))  # it has all that print() uses
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


class _BestEffort:
    """A log file whose write errors are dropped: a process must go on serving when its
    own log cannot be written (a full disk), as the logging module's handlers do."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def write(self, text: str) -> int:
        try:
            return self._file.write(text)
        except OSError:
            return 0

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError:
            pass


def _one_line_exception(sio: TextIO, exc_info: Any) -> None:
    """Without --debug, an exception is one line: its type and message."""
    _, exc, _ = exc_info
    sio.write(f"\n{type(exc).__name__}: {exc} (run with --debug for the traceback)")
