"""The bus log: every accepted envelope as one JSON line, one file per hour.

The broker calls :meth:`LogWriter.append` on its hot path; that only puts the envelope
on a queue. A background thread encodes and appends, flushing at least every
``flush_s`` (200 ms) and on :meth:`close`, so a power cut loses at most that much.
A crash mid-write leaves at most a torn last line; on start the writer cuts it off.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import IO

import msgspec
import structlog

from runtime.messages import Envelope

log = structlog.get_logger("log_writer")

_STOP = object()


def hour_file_name(ts: float) -> str:
    """``YYYY-MM-DDTHH.jsonl`` (UTC) for a unix time."""
    return time.strftime("%Y-%m-%dT%H.jsonl", time.gmtime(ts))


def repair_torn_tail(path: Path) -> int:
    """Cut a file back to its last complete line; returns how many bytes were cut."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # walk back in blocks until a newline shows where the last whole line ends
        pos = size
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
        else:
            keep = 0
        f.truncate(keep)
        return size - keep


class LogWriter:
    """Appends envelopes to ``<log_dir>/YYYY-MM-DDTHH.jsonl`` from a background thread."""

    def __init__(self, log_dir: Path, *, flush_s: float = 0.2) -> None:
        self.log_dir = log_dir
        self.flush_s = flush_s
        self.written = 0
        self.failed = 0
        self.last_error: str | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._encoder = msgspec.json.Encoder()
        self._file: IO[bytes] | None = None
        self._file_name = ""
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        current = self.log_dir / hour_file_name(time.time())
        if current.exists():
            cut = repair_torn_tail(current)
            if cut:
                log.warning("log_torn_tail_repaired", file=str(current), bytes_cut=cut)
        self._thread.start()

    def append(self, envelope: Envelope) -> None:
        """Queue one envelope; never blocks and never raises."""
        self._queue.put(envelope)

    def close(self) -> None:
        """Write what is queued, flush, and stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=10)

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=self.flush_s)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._flush()
                if self._file is not None:
                    self._file.close()
                return
            if isinstance(item, Envelope):
                self._write(item)
            if time.monotonic() - last_flush >= self.flush_s:
                self._flush()
                last_flush = time.monotonic()

    def _write(self, envelope: Envelope) -> None:
        name = hour_file_name(envelope.ts)
        try:
            if name != self._file_name or self._file is None:
                if self._file is not None:
                    self._file.close()
                self._file = (self.log_dir / name).open("ab")
                self._file_name = name
            self._file.write(self._encoder.encode(envelope) + b"\n")
            self.written += 1
        except OSError as exc:
            self._fail(exc)

    def _flush(self) -> None:
        if self._file is None:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.failed += 1
        if self.last_error != str(exc):
            log.error("log_write_failed", error=str(exc), dir=str(self.log_dir))
        self.last_error = str(exc)
