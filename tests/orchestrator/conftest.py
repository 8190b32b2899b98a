"""Fixtures for the data-layer tests: envelopes at chosen times and logs written directly."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec
import pytest

from orchestrator.log.layout import hour_file_name
from runtime import messages as m

# 2025-01-15T10:00:00Z: simulated logs start here, far from the real clock's hour
BASE = 1736935200.0

MakeEnvelope = Callable[..., m.Envelope]
WriteLog = Callable[[Path, Iterable[m.Envelope]], None]


@pytest.fixture
def base_ts() -> float:
    """The start of the first simulated hour."""
    return BASE


@pytest.fixture
def make_envelope() -> MakeEnvelope:
    """Builds envelopes with a given ``ts`` (ids and seq count up)."""
    counter = itertools.count(1)

    def make(
        topic: str,
        body: m.Body,
        *,
        ts: float,
        sender: str = "controller",
        conversation: str | None = None,
        task: str | None = None,
    ) -> m.Envelope:
        n = next(counter)
        return m.Envelope(
            id=f"{sender}-{n}",
            topic=topic,
            sender=sender,
            ts=ts,
            seq=n,
            body=body,  # type: ignore[arg-type]
            conversation=conversation,
            task=task,
        )

    return make


@pytest.fixture
def write_log() -> WriteLog:
    """Appends envelopes to their hour files in the writer's format, without a writer."""
    encoder = msgspec.json.Encoder()

    def write(log_dir: Path, envelopes: Iterable[m.Envelope]) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        by_file: dict[str, list[bytes]] = {}
        for env in envelopes:
            by_file.setdefault(hour_file_name(env.ts), []).append(encoder.encode(env) + b"\n")
        for name, lines in by_file.items():
            with (log_dir / name).open("ab") as f:
                f.write(b"".join(lines))

    return write
