"""The bus log: every accepted envelope as one JSON line, one file per hour.

The broker calls :meth:`LogWriter.append` on its hot path; that only puts the envelope
on a queue. A background thread encodes envelopes into a buffer and, at least every
``flush_s`` (200 ms) and on :meth:`close`, writes the buffer with one ``write`` and
``fdatasync``\\s it. A power cut therefore loses at most the envelopes accepted in the
last ``flush_s`` plus whatever was still queued behind a slow disk; a crash of the
process alone loses only the queue and buffer (the kernel keeps what was written).

A crash mid-write leaves at most a torn last line; readers skip it with a warning and
the writer cuts it off before it appends to that file again. A failed write (a full
disk, ``ENOSPC``) never raises: the lost envelopes are counted in :attr:`failed`, the
error is kept in :attr:`last_error`, ``on_fault`` is called once per new error, and the
writer tries again at the next flush.

A second thread applies retention (age and size), optional gzip of closed hours and the
minute index at start, hourly, when a new hour begins, and as soon as what the writer
wrote since the last pass takes the log over ``retain_mb`` (see
:mod:`orchestrator.log.retention`), so the size limit holds within the hour too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import structlog

from runtime.messages import Chunk, Cue, Envelope, TaskAssign, TaskUpdate, UserTurn

from .layout import hour_file_name, list_log_files
from .retention import MIB, MaintenanceReport, maintain

__all__ = [
    "REDACTED",
    "LogWriter",
    "hour_file_name",
    "redact_envelope",
    "redact_text",
    "repair_torn_tail",
]

log = structlog.get_logger("log_writer")

_STOP = object()
DRAIN_S = 0.05  # how often the writer thread wakes to take what was queued
_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
# the writer's only ways to the disk, named so tests can make them fail (ENOSPC, EIO)
_os_open = os.open
_os_write = os.write


def _sync_dir(path: Path) -> None:
    """fsync a directory, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


# what redact_text writes; group 1 is the length of the text it replaced
REDACTED = re.compile(r"<redacted [^ ]+ len=(\d+)>")


def redact_text(text: str, key: bytes | None = None) -> str:
    """``<redacted sha256:… len=N>``: equal texts stay comparable, the text is gone.

    Without a ``key`` the hash is a plain SHA-256, which a guess can confirm for short
    texts; with one it is an HMAC only the key's holder can check.
    """
    data = text.encode()
    if key is None:
        digest, scheme = hashlib.sha256(data).hexdigest(), "sha256"
    else:
        digest, scheme = hmac.new(key, data, hashlib.sha256).hexdigest(), "hmac-sha256"
    return f"<redacted {scheme}:{digest[:16]} len={len(text)}>"


def redact_envelope(envelope: Envelope, key: bytes | None = None) -> Envelope:
    """The envelope with user and narrator text replaced by :func:`redact_text`.

    Redacted: ``UserTurn.text``, ``Chunk.delta``, ``TaskAssign.text`` (the user's request
    as handed to an agent), a ``TaskUpdate``'s ``message`` and the strings in its
    ``data`` (results often quote the request), and a ``Cue``'s ``user_text``, ``cover``
    and ``attachments``. Ids, states, topics, times and numbers stay, so queries and
    timings still work.
    """
    body = envelope.body
    new_body: object
    match body:
        case UserTurn(text=text):
            new_body = msgspec.structs.replace(body, text=redact_text(text, key))
        case Chunk(delta=delta):
            new_body = msgspec.structs.replace(body, delta=redact_text(delta, key))
        case Cue(user_text=text, cover=cover, attachments=attachments):
            new_body = msgspec.structs.replace(
                body,
                user_text=redact_text(text, key) if text else "",
                cover=[redact_text(c, key) for c in cover],
                attachments=[redact_text(a, key) for a in attachments],
            )
        case TaskAssign(text=text):
            new_body = msgspec.structs.replace(body, text=redact_text(text, key))
        case TaskUpdate(message=message, data=data):
            new_body = msgspec.structs.replace(
                body,
                message=redact_text(message, key) if message else "",
                data={k: _redact_strings(v, key) for k, v in data.items()},
            )
        case _:
            return envelope
    return msgspec.structs.replace(envelope, body=new_body)


def _redact_strings(value: object, key: bytes | None) -> object:
    """``value`` with every string in it (nested in lists and dicts too) redacted."""
    match value:
        case str():
            return redact_text(value, key)
        case list():
            return [_redact_strings(v, key) for v in value]
        case dict():
            return {k: _redact_strings(v, key) for k, v in value.items()}
        case _:
            return value


class LogWriter:
    """Appends envelopes to ``<log_dir>/YYYY-MM-DDTHH.jsonl`` from a background thread.

    ``on_fault`` is called from the writer's threads with a one-line description of a
    storage error, once per new error; it must be thread-safe and must not block long
    (the broker publishes a ``Fault(kind="storage_error")`` from it).
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        flush_s: float = 0.2,
        retain_days: float = 14,
        retain_mb: float = 1024,
        compress: bool = False,
        compress_after_s: float = 300,
        index: bool = True,
        redact: bool = False,
        redact_key: bytes | None = None,
        on_fault: Callable[[str], None] | None = None,
        maintain_every_s: float = 3600,
        max_buffer_bytes: int = 1 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.log_dir = log_dir
        self.flush_s = flush_s
        self.retain_days = retain_days
        self.retain_mb = retain_mb
        self.compress = compress
        self.compress_after_s = compress_after_s
        self.index = index
        self.redact = redact
        self.redact_key = redact_key
        self.on_fault = on_fault
        self.maintain_every_s = maintain_every_s
        self.max_buffer_bytes = max_buffer_bytes
        self._clock = clock
        self.written = 0  # lines the kernel accepted
        self._appended = 0  # envelopes handed to append (what settle waits for)
        self._bytes_out = 0  # bytes written to hour files, in all
        # the log's size after the last maintenance pass and _bytes_out when it began:
        # with what was written since, the writer's estimate of the log's size
        self._size_basis: tuple[int, int] | None = None
        self.failed = 0  # envelopes lost to write errors
        self.last_error: str | None = None
        self.last_maintenance: MaintenanceReport | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._encoder = msgspec.json.Encoder()
        self._buffer = bytearray()
        self._buffered = 0  # lines in the buffer
        self._buffer_name = ""  # the hour file the buffer belongs to
        self._fd: int | None = None
        self._fd_name = ""
        self._fd_size = 0  # how long the open file is after our own writes
        self._dirty = False  # written since the last fdatasync
        self._failing = False
        # the writer opens files under this lock; maintenance checks `_keep` under it
        self._files_lock = threading.Lock()
        self._keep: set[str] = set()
        self._stop = threading.Event()
        self._maintain_now = threading.Event()  # a pass is due
        self._pass_lock = threading.Lock()  # one maintenance pass at a time
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._maintainer = threading.Thread(
            target=self._maintain_loop, name="log-maintenance", daemon=True
        )

    # -- public ---------------------------------------------------------------------------

    def start(self) -> None:
        """Repair torn tails left by a crash, then start writing and maintenance."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for f in list_log_files(self.log_dir):
            if f.compressed:
                continue
            try:
                cut = repair_torn_tail(f.path)
            except OSError as exc:
                self._fail(exc, "repair")
                continue
            if cut:
                log.warning("log_torn_tail_repaired", file=str(f.path), bytes_cut=cut)
        self._refresh_keep(self._clock())
        self._maintain_now.set()  # the start pass
        self._thread.start()
        self._maintainer.start()

    @property
    def failing(self) -> str | None:
        """The storage error that the last write met, while writes keep failing."""
        return self.last_error if self._failing else None

    def append(self, *envelopes: Envelope) -> None:
        """Queue envelopes (a batch is one hand-over to the writer thread); never blocks
        and never raises."""
        self._appended += len(envelopes)
        self._queue.put(envelopes)

    def settle(self, timeout: float = 30) -> bool:
        """Wait until every envelope appended so far is written (or counted as failed) and
        no maintenance pass is due or running; False if that took over ``timeout`` s.

        For tests and simulations that drive the writer with their own clock.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.written + self.failed >= self._appended and not self._maintain_now.is_set():
                if self._pass_lock.acquire(blocking=False):
                    self._pass_lock.release()
                    if not self._maintain_now.is_set():  # none was asked for meanwhile
                        return True
            time.sleep(0.002)
        return False

    def close(self) -> None:
        """Write what is queued, flush, and stop both threads."""
        self._stop.set()
        self._maintain_now.set()
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=10)
        if self._maintainer.is_alive():
            self._maintainer.join(timeout=10)

    def maintain(self, now: float | None = None) -> MaintenanceReport:
        """Run one retention / compression / index pass now (it also runs hourly); waits
        for a pass the maintenance thread is running."""
        return self._maintain(now, stop=lambda: False)

    def _maintain(
        self, now: float | None, stop: Callable[[], bool], due: bool = False
    ) -> MaintenanceReport:
        # two passes at once would race: one indexing or gzipping a file the other deletes
        with self._pass_lock:
            if due:
                self._maintain_now.clear()  # under the lock, so settle() sees no gap
            mark = self._bytes_out
            now = self._clock() if now is None else now
            with self._files_lock:
                self._refresh_keep(now)
            try:
                report = maintain(
                    self.log_dir,
                    retain_days=self.retain_days,
                    retain_mb=self.retain_mb,
                    compress=self.compress,
                    compress_after_s=self.compress_after_s,
                    index=self.index,
                    now=now,
                    keep=self._keep,
                    stop=stop,
                    lock=self._files_lock,
                )
            except OSError as exc:
                self._fail(exc, "maintenance")
                return MaintenanceReport()
            self.last_maintenance = report
            self._size_basis = (report.total_bytes, mark)
            return report

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        # Wake on a timer and drain in bulk, never per envelope: a wake-up per message
        # makes this thread and the broker's forwarding loop trade the GIL constantly.
        deadline = time.monotonic() + self.flush_s
        while True:
            stopping = self._stop.wait(DRAIN_S)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    continue
                assert isinstance(item, tuple)
                for envelope in item:
                    self._buffer_line(envelope)
                    if len(self._buffer) >= self.max_buffer_bytes:
                        self._write_buffer()
            if stopping:
                self._flush()
                self._close_file()
                return
            if time.monotonic() >= deadline:
                self._flush()
                deadline = time.monotonic() + self.flush_s

    def _buffer_line(self, envelope: Envelope) -> None:
        name = hour_file_name(envelope.ts)
        if name != self._buffer_name:
            self._write_buffer()  # one buffer holds one file's lines
            self._buffer_name = name
        if self.redact:
            envelope = redact_envelope(envelope, self.redact_key)
        self._encoder.encode_into(envelope, self._buffer, -1)
        self._buffer.append(10)  # b"\n"
        self._buffered += 1

    def _refresh_keep(self, now: float) -> None:
        """Under the files lock: the file open now and the clock's hour are off limits."""
        self._keep.clear()
        self._keep.add(hour_file_name(now))
        if self._fd_name:
            self._keep.add(self._fd_name)

    def _open(self, name: str) -> int:
        """The descriptor of ``name``, switching files if needed."""
        if self._fd is not None and self._fd_name == name:
            return self._fd
        self._close_file()
        with self._files_lock:
            path = self.log_dir / name
            existed = path.exists()
            if existed:
                repair_torn_tail(path)  # a write that failed part-way left half a line
            fd = _os_open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            self._fd_size = os.fstat(fd).st_size
            if not existed:
                _sync_dir(self.log_dir)  # so a power cut cannot lose the new file's name
            newer = name > self._fd_name
            self._fd, self._fd_name = fd, name
            self._refresh_keep(self._clock())
        if newer:
            self._maintain_now.set()  # a new hour: the last one can be indexed or compressed
        return fd

    def _close_file(self) -> None:
        if self._fd is None:
            return
        if self._dirty:
            try:
                _fdatasync(self._fd)
            except OSError as exc:
                self._fail(exc, "sync")
        self._drop_file()

    def _write_buffer(self) -> bool:
        """Write the buffer to its hour file in one go; on error count what was lost.

        Returns False when the write failed."""
        if not self._buffer:
            return True
        data, lines = memoryview(self._buffer), self._buffered
        done = 0
        try:
            fd = self._open(self._buffer_name)
            self._guard_foreign_bytes(fd)
            while done < len(data):
                done += _os_write(fd, data[done:])
            self._fd_size += done
        except OSError as exc:
            kept = data[:done].tobytes().count(b"\n")
            self.written += kept
            self.failed += lines - kept
            self._drop_file()
            self._fail(exc, "write")
            return False
        else:
            self._bytes_out += len(data)
            self._check_size()  # before `written` moves, so settle() sees the request
            self.written += lines
            self._dirty = True
            return True
        finally:
            data.release()
            self._buffer.clear()
            self._buffered = 0

    def _guard_foreign_bytes(self, fd: int) -> None:
        """Someone else changed the file we append to (a line appended by hand, a second
        writer, a cut): say so, and if it now ends mid-line start ours on a new line, so
        that none of ours is glued to theirs and made unreadable."""
        size = os.fstat(fd).st_size
        if size == self._fd_size:
            return
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        if torn:
            _os_write(fd, b"\n")
        log.warning(
            "log_foreign_write",
            file=self._fd_name,
            bytes=size - self._fd_size,
            torn=torn,
            why="the bus log file changed under its writer; its own lines are kept whole",
        )
        self._fd_size = size + torn

    def _check_size(self) -> None:
        """Ask for a pass now if what was written since the last one takes the log over
        ``retain_mb`` (not when that pass already could not get under it: then only the
        file being written is left, and the next hour's pass deletes)."""
        if self._size_basis is None or self._maintain_now.is_set():
            return
        total, mark = self._size_basis
        limit = self.retain_mb * MIB
        if total <= limit < total + self._bytes_out - mark:
            self._maintain_now.set()

    def _flush(self) -> None:
        """Write the buffer and ``fdatasync`` the file: after this a power cut loses none
        of it."""
        if not self._write_buffer() or not self._dirty or self._fd is None:
            return
        try:
            _fdatasync(self._fd)
        except OSError as exc:
            self._drop_file()
            self._fail(exc, "sync")
            return
        self._dirty = False
        self._recovered()

    def _drop_file(self) -> None:
        """Forget the descriptor (after an error the next open repairs any torn tail)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
            self._dirty = False

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("log_write_recovered", failed=self.failed, dir=str(self.log_dir))

    def _fail(self, exc: OSError, action: str) -> None:
        message = f"bus log {action} failed in {self.log_dir}: {exc.strerror or exc}"
        if exc.errno is not None:
            message += f" (errno {exc.errno})"
        new = not self._failing or self.last_error != message
        self._failing = True
        self.last_error = message
        if not new:
            return
        log.error("log_write_failed", error=message, failed=self.failed)
        if self.on_fault is not None:
            try:
                self.on_fault(message)
            except Exception as cb_exc:  # a broken callback must not stop the log
                log.error("log_fault_callback_failed", error=repr(cb_exc))

    # -- the maintenance thread -----------------------------------------------------------

    def _maintain_loop(self) -> None:
        while not self._stop.is_set():
            self._maintain(None, stop=self._stop.is_set, due=True)
            self._maintain_now.wait(self.maintain_every_s)
