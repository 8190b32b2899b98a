"""The broker: XSUB for publishers, XPUB for subscribers, and a check on every message.

It does not use the blind ``zmq.proxy``: each message is decoded, its CURVE identity
(the ``User-Id`` our ZAP handler sets) checked against the ACL and the envelope's
``sender``, and only then forwarded and handed to the log writer. Subscriptions are
checked too (``XPUB_MANUAL``). Anything wrong is dropped and reported on
``sys.rejected`` (bad input) or ``sys.violation`` (ACL), never forwarded.

The forwarding loop is one blocking thread, not asyncio: it is the hot path, and
asyncio scheduling per message would halve its throughput. It polls with pyzmq; the
socket calls for each message (receive, forward) are in C (``runtime/_forward.c``), on
the same sockets, since pyzmq's wrappers cost more interpreter time per message than
all the checks, which stay here.

Slow subscribers: XPUB_NODROP stays off and each subscriber pipe has a send
high-water mark of ``sndhwm`` messages; when a subscriber falls that far behind,
ZeroMQ drops messages to that subscriber only. The broker and the other subscribers
are never blocked; the slow one sees gaps in each sender's ``seq``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import structlog
import zmq

from orchestrator.log.process import LogProcess

from . import _forward, acl
from . import messages as m
from .auth import Authenticator, identity_of
from .errors import ConfigError
from .keys import curve_server, load_public
from .paths import DataDir, Endpoints, write_atomic

log = structlog.get_logger("broker")

DEFAULT_MAX_BYTES = 1 << 20
RECEIVE_BATCH = 256  # messages taken per poll at most, so subscriptions wait no longer
SWITCH_INTERVAL_S = 0.0005
# After a crash, subscribers get this long to reconnect and re-subscribe before what
# publishers queued during the outage is forwarded (their reconnect interval is 1 s at
# most); otherwise it would reach nobody.
RESUBSCRIBE_S = 2.0


def check_bind(endpoint: str, allow_remote: bool) -> None:
    """Refuse a tcp:// address beyond loopback unless the user asked for it."""
    if not endpoint.startswith("tcp://"):
        return
    host = urlsplit(endpoint).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ConfigError(
            f"refusing to bind {endpoint}: it is not a loopback address; "
            "pass --allow-remote if other hosts should reach it"
        )


@dataclass
class BrokerStats:
    forwarded: int = 0
    rejected: int = 0
    violations: int = 0
    subscriptions: int = 0


class Broker:
    """One broker bound to ``pub``/``sub`` endpoints, serving until :meth:`stop`."""

    def __init__(
        self,
        data: DataDir,
        *,
        bind: str | None = None,
        allow_remote: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        engine_endpoint: str | None = None,
        sndhwm: int = 10_000,
        log_retain_days: float = 14,
        log_retain_mb: float = 1024,
        log_redact: bool = False,
    ) -> None:
        self.data = data
        self.max_bytes = max_bytes
        self.engine_endpoint = engine_endpoint
        self.sndhwm = sndhwm
        self.stats = BrokerStats()
        self._bind = bind
        self._allow_remote = allow_remote
        self._stamper = m.Stamper("broker")
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._auth: Authenticator | None = None
        self._stop_endpoint = f"inproc://broker-stop-{id(self)}"
        self._stop_lock = threading.Lock()
        self._ipc_files: list[Path] = []
        self._acl_cache: dict[tuple[str, str, type[m.Body]], tuple[str, str] | None] = {}
        # the bus log is written by a process of its own (orchestrator/log/process.py):
        # its encoding and disk writes must not take this loop's CPU or GIL
        self._log = LogProcess(
            data, retain_days=log_retain_days, retain_mb=log_retain_mb, redact=log_redact
        )
        self.endpoints: Endpoints | None = None

    def _endpoints_for(self) -> tuple[str, str]:
        if self._bind is None:
            return self.data.ipc("pub"), self.data.ipc("sub")
        check_bind(self._bind, self._allow_remote)
        if not self._bind.startswith("tcp://"):
            raise ConfigError(f"--bind takes tcp://HOST:PORT, not {self._bind!r}")
        base = self._bind.rsplit(":", 1)
        port = int(base[1])
        if port == 0:
            raise ConfigError("--bind needs a fixed port: subscribers use PORT+1")
        return self._bind, f"{base[0]}:{port + 1}"

    def run(self) -> None:
        """Bind, write endpoints.json, and forward until :meth:`stop` is called."""
        self.data.ensure()
        # The log writer's thread encodes in batches; with Python's default 5 ms switch
        # interval the forwarding loop could wait that long for the GIL per message.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._auth = Authenticator(self._ctx, self.data.keys)
        self._auth.start()
        xsub = self._ctx.socket(zmq.XSUB)
        xpub = self._ctx.socket(zmq.XPUB)
        stop = self._ctx.socket(zmq.PULL)  # wake-up to stop
        pub_ep, sub_ep = self._endpoints_for()
        restarted = self.data.endpoints_file.exists()  # a broker died here without cleaning up
        try:
            for sock in (xsub, xpub):
                curve_server(sock, self.data.keys, "broker")
                sock.linger = 0
            xpub.setsockopt(zmq.XPUB_MANUAL, 1)
            xpub.setsockopt(zmq.SNDHWM, self.sndhwm)
            xsub.setsockopt(zmq.RCVHWM, self.sndhwm)
            for sock, ep in ((xsub, pub_ep), (xpub, sub_ep)):
                self._unlink_stale_ipc(ep)
                sock.bind(ep)
            stop.bind(self._stop_endpoint)
            xsub.send(b"\x01")  # receive every topic; the ACL decides, not the filter
            log_sock = self._log.start(self._ctx)
            self.endpoints = Endpoints(
                pub=pub_ep,
                sub=sub_ep,
                engine=self.engine_endpoint,
                broker_public_key=load_public(self.data.keys, "broker").decode(),
                max_bytes=self.max_bytes,
            )
            write_atomic(self.data.endpoints_file, msgspec.json.encode(self.endpoints))
            log.info("broker_ready", pub=pub_ep, sub=sub_ep)
            self._serve(xsub, xpub, stop, log_sock, hold_s=RESUBSCRIBE_S if restarted else 0.0)
        finally:
            for sock in (xsub, xpub, stop):
                sock.close(linger=0)
            self._auth.stop()
            self._log.close()
            self._ctx.term()
            self.data.endpoints_file.unlink(missing_ok=True)
            for path in self._ipc_files:
                path.unlink(missing_ok=True)
            log.info("broker_stopped", **vars(self.stats))

    def stop(self) -> None:
        """Ask the forwarding loop to end (thread-safe)."""
        with self._stop_lock:
            sock = self._ctx.socket(zmq.PUSH)
            try:
                sock.connect(self._stop_endpoint)
                sock.send(b"stop")
            finally:
                sock.close(linger=1000)

    def _unlink_stale_ipc(self, endpoint: str) -> None:
        if endpoint.startswith("ipc://"):
            path = Path(endpoint.removeprefix("ipc://"))
            path.unlink(missing_ok=True)
            self._ipc_files.append(path)

    def _serve(
        self,
        xsub: zmq.Socket[Any],
        xpub: zmq.Socket[Any],
        stop: zmq.Socket[Any],
        log_sock: zmq.Socket[Any],
        hold_s: float = 0.0,
    ) -> None:
        """Forward until stopped; publishers are read only after ``hold_s`` (subscribers
        are served from the start)."""
        poller = zmq.Poller()
        for sock in (xpub, stop, log_sock):
            poller.register(sock, zmq.POLLIN)
        hold_until = time.monotonic() + hold_s if hold_s > 0 else 0.0
        if not hold_until:
            poller.register(xsub, zmq.POLLIN)
        else:
            log.info("broker_holding", seconds=hold_s, reason="restarted: subscribers first")
        check_log_at = time.monotonic() + 1.0
        dropped_reported = 0
        while True:
            wait = self._log.wait_s(time.monotonic())
            if hold_until:
                wait = max(0.0, min(1.0 if wait is None else wait, hold_until - time.monotonic()))
            ready = dict(poller.poll(1000 if wait is None else math.ceil(wait * 1000)))
            if stop in ready:
                return
            now = time.monotonic()
            if hold_until and now >= hold_until:
                hold_until = 0.0
                poller.register(xsub, zmq.POLLIN)
            if now >= check_log_at:  # once a second, whatever the traffic
                check_log_at = now + 1.0
                if (code := self._log.died()) is not None:
                    # the log's process died (it dies with us, not we with it): another
                    poller.unregister(log_sock)
                    log_sock = self._log.restart(self._ctx)
                    poller.register(log_sock, zmq.POLLIN)
                    why = f"the bus log writer exited with code {code} and was restarted; what it had not written is lost"
                    log.error("log_writer_restarted", code=code)
                    fault = m.Fault(kind="storage_error", message=why)
                    self._report(xpub, "event.broker", fault)
            if log_sock in ready:
                for message in self._log.receive():
                    fault = m.Fault(kind="storage_error", message=message)
                    self._report(xpub, "event.broker", fault)
            if xpub in ready:
                self._drain_subscriptions(xpub)
            if xsub in ready:
                # drain a batch before polling again: poll is the expensive call
                for identity, frames in _forward.receive(xsub.underlying, RECEIVE_BATCH):
                    self._on_publish(identity, frames, xpub)
            if self._log.wait_s(time.monotonic()) == 0.0 and self._log.flush():
                if self._log.dropped >= dropped_reported + 10_000 or not dropped_reported:
                    # the first loss, then one report per 10,000 more
                    dropped_reported = self._log.dropped
                    why = f"the bus log writer is far behind or gone; {self._log.dropped} envelopes not logged"
                    log.error("log_writer_behind", dropped=self._log.dropped)
                    self._report(xpub, "event.broker", m.Fault(kind="storage_error", message=why))

    def _drain_subscriptions(self, xpub: zmq.Socket[Any]) -> None:
        while True:
            try:
                frame = xpub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            if not data or data[0] not in (0, 1):
                continue
            identity = identity_of(frame)
            prefix = data[1:].decode("utf-8", "replace")
            if data[0] == 0:
                xpub.setsockopt(zmq.UNSUBSCRIBE, data[1:])
                continue
            if acl.may_read(identity, prefix):
                xpub.setsockopt(zmq.SUBSCRIBE, data[1:])
                self.stats.subscriptions += 1
                failing = self._log.failing
                if failing and "event.broker".startswith(prefix):
                    # a process that starts while the log cannot be written hears so too
                    fault = m.Fault(kind="storage_error", message=failing)
                    self._report(xpub, "event.broker", fault)
            else:
                self._violate(xpub, identity, prefix, f"{identity} may not subscribe to {prefix!r}")

    def _on_publish(self, identity: str, frames: list[bytes], xpub: zmq.Socket[Any]) -> None:
        topic = frames[0].decode("utf-8", "replace")[:200]
        if len(frames) != 2:
            self._reject(
                xpub, identity, topic, f"expected 2 frames [topic, payload], got {len(frames)}"
            )
            return
        payload = frames[1]
        if len(payload) > self.max_bytes:
            self._reject(
                xpub,
                identity,
                topic,
                f"message of {len(payload)} bytes exceeds the {self.max_bytes}-byte limit",
            )
            return
        try:
            envelope = m.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._reject(xpub, identity, topic, f"payload does not decode as an Envelope: {exc}")
            return
        if envelope.topic != topic:
            why = f"envelope topic {envelope.topic!r} differs from frame topic"
            self._reject(xpub, identity, topic, why, envelope.id)
            return
        if envelope.sender != identity:
            self._violate(
                xpub,
                identity,
                topic,
                f"sender {envelope.sender!r} is not the authenticated identity {identity!r}",
            )
            return
        verdict = self._verdict(identity, topic, type(envelope.body))
        if verdict is not None:
            kind, reason = verdict
            if kind == "violation":
                self._violate(xpub, identity, topic, reason)
            else:
                self._reject(xpub, identity, topic, reason, envelope.id)
            return
        _forward.send(xpub.underlying, frames[0], payload)
        self.stats.forwarded += 1
        self._log.append(payload)

    def _verdict(self, identity: str, topic: str, body: type[m.Body]) -> tuple[str, str] | None:
        """The ACL and topic/body checks, cached: both depend only on these three."""
        key = (identity, topic, body)
        if key not in self._acl_cache:
            if len(self._acl_cache) > 10_000:  # a peer inventing topics cannot grow it forever
                self._acl_cache.clear()
            reason = acl.publish_violation(identity, topic)
            mismatch = None if reason else acl.body_mismatch(topic, body)
            self._acl_cache[key] = (
                ("violation", reason) if reason else ("rejected", mismatch) if mismatch else None
            )
        return self._acl_cache[key]

    def _reject(
        self,
        xpub: zmq.Socket[Any],
        sender: str,
        topic: str,
        reason: str,
        envelope_id: str | None = None,
    ) -> None:
        self.stats.rejected += 1
        log.warning("message_rejected", sender=sender, topic=topic, reason=reason)
        body = m.Rejected(sender=sender, topic=topic, reason=reason, id=envelope_id)
        self._report(xpub, "sys.rejected", body)

    def _violate(self, xpub: zmq.Socket[Any], identity: str, topic: str, reason: str) -> None:
        self.stats.violations += 1
        log.warning("acl_violation", identity=identity, topic=topic, reason=reason)
        self._report(
            xpub, "sys.violation", m.Violation(identity=identity, topic=topic, reason=reason)
        )

    def _report(self, xpub: zmq.Socket[Any], topic: str, body: m.Body) -> None:
        envelope = self._stamper.stamp(topic, body)
        payload = m.encode(envelope)
        xpub.send_multipart([topic.encode(), payload])
        self._log.append(payload)


def serve(data: DataDir, **options: Any) -> None:
    """Run a broker in this process until SIGTERM/SIGINT (used by ``runtime broker``)."""
    import signal

    broker = Broker(data, **options)

    def _on_signal(signum: int, _frame: object) -> None:
        threading.Thread(target=broker.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    started = time.time()
    broker.run()
    log.debug("broker_exit", pid=os.getpid(), uptime_s=round(time.time() - started, 1))
