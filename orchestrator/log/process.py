"""The bus log's own process: the broker hands it every envelope it forwards and the
:class:`~orchestrator.log.writer.LogWriter` here encodes and writes them, so that work
never shares the broker's CPU time or its GIL (measured in ``benchmarks/bus.py``: with
the writer in the broker's process the p99 latency at 10k msg/s was 9-35 ms; without
it, about 1 ms).

The broker starts it (``python -m orchestrator.log.process``) and talks to it over one
PAIR socket on ``ipc``:

* broker -> writer: the envelopes the broker forwarded, every ``BATCH_S`` or
  ``BATCH_MAX`` envelopes, as one msgpack array whose items are the payloads exactly
  as forwarded (a header and the payloads joined, so the writer decodes a batch in one
  call); an empty frame means "flush and exit";
* writer -> broker: ``F`` + message when a storage error starts (or changes), ``R``
  when writes succeed again. The broker publishes the first as a ``Fault`` on
  ``event.broker``.

It dies with the broker (``runtime.lifeline``) and flushes on SIGTERM. It runs as
``SCHED_IDLE`` (:func:`run_below_everything`) and wakes on a timer, so on a busy
machine it never takes the CPU from the processes that carry messages; it catches up
whenever a core is free.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import zmq

from runtime import lifeline, logconfig
from runtime import messages as m
from runtime.errors import ChorusError
from runtime.lifeline import die_with_parent
from runtime.paths import DataDir

from .writer import LogWriter

FAULT, RECOVERED, HELLO = b"F", b"R", b"H"
STOP = b""
DRAIN_S = 0.01  # the writer takes what arrived at most this often, never per message
BATCH_S, BATCH_MAX = 0.005, 512  # the broker hands over this often, or this many at once
HANDOFF_HWM = 10_000  # batches in flight before the broker counts envelopes as dropped
NICENESS = 19  # where SCHED_IDLE is not to be had
_batch = msgspec.msgpack.Decoder(list[m.Envelope])


def batch_frame(payloads: Sequence[bytes | memoryview]) -> bytes:
    """One frame for ``payloads`` (each one msgpack envelope): a msgpack array of them."""
    n = len(payloads)
    head = (
        bytes((0x90 | n,))
        if n < 16
        else b"\xdc" + n.to_bytes(2, "big")
        if n < 1 << 16
        else b"\xdd" + n.to_bytes(4, "big")
    )
    return head + b"".join(payloads)


def serve(sock: zmq.Socket[Any], writer: LogWriter) -> None:
    """Write what arrives until the stop frame; report storage faults back."""
    faults: queue.SimpleQueue[str] = queue.SimpleQueue()
    writer.on_fault = faults.put
    writer.start()
    sock.send(HELLO)
    failing: str | None = None
    try:
        while True:
            if sock.poll(100):
                while True:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frame == STOP:
                        return
                    try:
                        batch = _batch.decode(frame)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue  # the broker decoded each before forwarding; never happens
                    writer.append(*batch)
                time.sleep(DRAIN_S)
            while not faults.empty():
                sock.send(FAULT + faults.get().encode())
            now = writer.failing
            if failing and not now:
                sock.send(RECOVERED)
            failing = now
    finally:
        writer.close()


def run_below_everything() -> None:
    """Put this process (and the threads it starts later) below every ordinary task:
    logging may lag, forwarding may not.

    ``SCHED_IDLE`` (Linux; no privilege needed to lower oneself): a task that wakes takes
    the core from us at once. A nice value is not enough: the kernel lets a running task
    finish its slice (a millisecond or more) before a waking one preempts it, and this
    writer's bursts of encoding (~0.7 ms every 10 ms at 10k msg/s) then sat in the
    broker's p99 (``benchmarks/bus.py``). The cost: while every core is busy the writer
    waits; the broker's hand-off holds 10,000 batches before it counts losses and reports
    them as a ``storage_error`` fault (see :meth:`LogProcess.flush`).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or a sandbox that forbids it
        os.nice(NICENESS)


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m orchestrator.log.process")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--endpoint", required=True, help="the broker's PAIR socket")
    parser.add_argument("--retain-days", type=float, default=14)
    parser.add_argument("--retain-mb", type=float, default=1024)
    parser.add_argument("--redact", action="store_true")
    args = parser.parse_args(argv)
    data = DataDir.at(args.data_dir)
    logconfig.configure("log-writer", log_dir=data.process_logs, console=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `finally` flushes
    run_below_everything()
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.linger = 1000
    sock.connect(args.endpoint)
    writer = LogWriter(
        data.logs, retain_days=args.retain_days, retain_mb=args.retain_mb, redact=args.redact
    )
    try:
        serve(sock, writer)
    finally:
        sock.close()
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())


class LogProcess:
    """The broker's end: starts the writer process and hands it what to write."""

    def __init__(
        self, data: DataDir, *, retain_days: float, retain_mb: float, redact: bool
    ) -> None:
        self.data = data
        self.options = [
            *("--retain-days", str(retain_days)),
            *("--retain-mb", str(retain_mb)),
            *(["--redact"] if redact else []),
        ]
        self.failing: str | None = None  # the storage error the writer reports, while it lasts
        self.dropped = 0  # envelopes the writer could not take (HANDOFF_HWM behind, or dead)
        self._pending: list[bytes | memoryview] = []
        self._since = 0.0  # when the oldest pending envelope was appended
        self.sock: zmq.Socket[Any] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ctx: zmq.Context[Any], timeout: float = 60) -> zmq.Socket[Any]:
        """Bind, start the writer and wait until it is connected (nothing is lost before)."""
        endpoint = self.data.ipc("log")
        Path(endpoint.removeprefix("ipc://")).unlink(missing_ok=True)
        sock: zmq.Socket[Any] = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.SNDHWM, HANDOFF_HWM)
        sock.linger = 5000
        sock.bind(endpoint)
        self.sock = sock
        self.data.process_logs.mkdir(parents=True, exist_ok=True)
        with (self.data.process_logs / "log-writer.stderr").open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    *("-m", "orchestrator.log.process"),
                    *("--data-dir", str(self.data.root), "--endpoint", endpoint),
                    *self.options,
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, lifeline.ENV: str(os.getpid())},
            )
        if not sock.poll(int(timeout * 1000)) or sock.recv() != HELLO:
            raise ChorusError(
                f"the bus log writer did not start; see {self.data.process_logs}/log-writer.stderr"
            )
        return sock

    def append(self, payload: bytes | memoryview) -> None:
        """Queue one encoded envelope for the next :meth:`flush`."""
        if not self._pending:  # only a batch's first envelope needs the clock
            self._since = time.monotonic()
        self._pending.append(payload)

    def wait_s(self, now: float) -> float | None:
        """How long until a flush is due (0: now), or None when nothing is pending."""
        if not self._pending:
            return None
        if len(self._pending) >= BATCH_MAX:
            return 0.0
        return max(0.0, self._since + BATCH_S - now)

    def flush(self) -> int:
        """Hand what was appended over in one frame; how many could not be (counted)."""
        if not self._pending:
            return 0
        assert self.sock is not None
        pending, self._pending = self._pending, []
        try:
            self.sock.send(batch_frame(pending), zmq.NOBLOCK)
            return 0
        except zmq.Again:
            self.dropped += len(pending)
            return len(pending)

    def receive(self) -> list[str]:
        """New storage errors the writer reported (and note recoveries)."""
        assert self.sock is not None
        new: list[str] = []
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return new
            if frame.startswith(FAULT):
                self.failing = frame[1:].decode("utf-8", "replace")
                new.append(self.failing)
            elif frame == RECOVERED:
                self.failing = None

    def died(self) -> int | None:
        """The writer's exit code if it has died (then call :meth:`restart`), else None."""
        return None if self.proc is None else self.proc.poll()

    def restart(self, ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
        """A new writer on a new socket (what the dead one had not written is lost)."""
        if self.sock is not None:
            self.sock.close(linger=0)
        return self.start(ctx)

    def close(self, timeout: float = 15) -> None:
        """Ask the writer to flush and exit; kill it if it does not."""
        if self.sock is not None:
            self.flush()
            try:
                self.sock.send(STOP, zmq.NOBLOCK)
            except zmq.Again:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sock is not None:
            self.sock.close(linger=0)
            Path(self.data.ipc("log").removeprefix("ipc://")).unlink(missing_ok=True)
