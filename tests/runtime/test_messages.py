"""Envelopes and bodies: every type round-trips, and the checked-in schemas match."""

from __future__ import annotations

import msgspec
import pytest

from runtime import messages as m
from runtime import schemas

SAMPLES: list[m.Body] = [
    m.UserTurn(text="hello"),
    m.Chunk(stream="s1", seq=3, delta="wor", final=True, finish="done", sources=["a.md"]),
    m.TaskAssign(task="t1", kind="code", text="print(1)", params={"sleep": "1"}),
    m.TaskCancel(task="t1", reason="user asked"),
    m.TaskUpdate(
        task="t1", state="result", message="ok", data={"stdout": "1\n"}, artefacts=["x.py"]
    ),
    m.Cue(speak_now=True, priority=2, reason="result", cover=["t1"]),
    m.Decision(action="held", reason="min gap"),
    m.Heartbeat(state="busy", task="t1", queue_depth=2, load=0.5, pid=42),
    m.EngineStats(
        tokens_per_s=12.5,
        sessions=1,
        active_requests=0,
        cache_fill=0.3,
        device="cpu",
        resident_mb=512.0,
    ),
    m.ConfigChange(key="idle_s", value="4"),
    m.Ack(id="abc"),
    m.Ping(nonce="n"),
    m.Rejected(sender="coder", topic="x", reason="bad"),
    m.Violation(identity="coder", topic="user.out", reason="no"),
    m.ProcessEvent(process="coder", reason="exited", restarts=1, pid=7),
    m.Fault(kind="storage_error", message="disk full"),
    m.Rollout(
        action="rollback",
        candidate="c0ffee",
        baseline="baba",
        percent=0.0,
        reason="error rate",
        candidate_figures=m.ArmFigures(samples=5, errors=5),
    ),
    m.Note(name="found", data={"n": 3}),
]


def test_samples_cover_every_body_type() -> None:
    assert {type(b) for b in SAMPLES} == set(m.BODY_TYPES)


@pytest.mark.parametrize("body", SAMPLES, ids=lambda b: type(b).__name__)
def test_envelope_round_trips_through_msgpack(body: m.Body) -> None:
    env = m.Stamper("coder").stamp("event.coder", body, conversation="c1", task="t1")
    back = m.decode(m.encode(env))
    assert back == env
    assert type(back.body) is type(body)


def test_stamper_gives_unique_ids_and_increasing_seq() -> None:
    s = m.Stamper("narrator")
    envs = [s.stamp("user.out", m.Chunk(stream="x", seq=i, delta="")) for i in range(5)]
    assert len({e.id for e in envs}) == 5
    assert [e.seq for e in envs] == [1, 2, 3, 4, 5]


def test_garbage_does_not_decode() -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        m.decode(b"\x93\x01\x02garbage")
    with pytest.raises(msgspec.ValidationError):
        m.decode(
            msgspec.msgpack.encode(
                {
                    "id": "x",
                    "topic": "t",
                    "sender": "s",
                    "ts": 1.0,
                    "seq": 1,
                    "body": {"type": "Nope"},
                }
            )
        )


def test_checked_in_schemas_match_the_code() -> None:
    """Fails when a Struct changed but `make schemas` was not run."""
    assert schemas.drift() == []
