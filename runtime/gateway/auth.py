"""The gateway's bearer token, its per-token rate limit and its per-token stream limit.

The token is 32 url-safe random bytes in ``data/keys/gateway.token`` (mode 0600),
created on first start and kept after that, so a page or an app that has it keeps
working across restarts. Delete the file to revoke it (a new one is made at the next
start).
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

TOKEN_FILE = "gateway.token"
COOKIE = "chorus_token"


def load_or_create_token(key_dir: Path) -> str:
    """The gateway token of a data directory; made (0600) when there is none yet.

    Two gateways starting at once agree on one token: the file is linked into place,
    which fails when it already exists, and then the existing one is read.
    """
    path = key_dir / TOKEN_FILE
    token = _read_token(path)
    if token is not None:
        return token
    key_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=key_dir, prefix=f".{TOKEN_FILE}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    token = _read_token(path)
    if token is None:
        raise ConfigError(f"{path} is empty; delete it and start the gateway again")
    return token


def _read_token(path: Path) -> str | None:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the gateway token {path}: {exc}") from exc
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # a copied file may have lost its mode; a token is a secret
    return token or None


def token_matches(given: str | None, token: str) -> bool:
    """Whether ``given`` is the token, compared in constant time."""
    return given is not None and secrets.compare_digest(given.encode(), token.encode())


_RATE = re.compile(r"^\s*(\d+)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?\s*$")
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_PER |= {"h": 3600.0, "hour": 3600.0}


def parse_rate(text: str) -> float:
    """Requests per minute from ``60/min``, ``2/s``, ``600/hour`` or a bare count (per
    minute); 0 turns the limit off."""
    match = _RATE.match(text)
    if match is None:
        raise ConfigError(f"cannot read the rate {text!r}: write it like 60/min, 2/s or 600/hour")
    count, unit = int(match[1]), match[2] or "min"
    return count * 60.0 / _PER[unit]


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """A token bucket per key: ``per_minute`` requests a minute, bursts up to that many."""

    per_minute: float
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def wait_s(self, key: str) -> float:
        """0 when a request for ``key`` may go now (and counts it), else the seconds
        until one may."""
        if self.per_minute <= 0:
            return 0.0
        now = self.clock()
        capacity = max(self.per_minute, 1.0)
        bucket = self._buckets.setdefault(key, _Bucket(capacity, now))
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.at) * self.per_minute / 60.0)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) * 60.0 / self.per_minute


@dataclass
class StreamLimit:
    """At most ``per_token`` Server-Sent Event responses open at once per key: each one
    holds a bus subscription, so a flood of them must not be free."""

    per_token: int
    _open: collections.Counter[str] = field(default_factory=collections.Counter)

    def acquire(self, key: str) -> bool:
        """Count one more open stream for ``key``; False (not counted) when at the limit."""
        if self._open[key] >= self.per_token:
            return False
        self._open[key] += 1
        return True

    def release(self, key: str) -> None:
        """One stream of ``key`` ended."""
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]
