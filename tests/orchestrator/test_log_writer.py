"""The bus log writer: hour files, flush policy, torn tails, disk-full, redaction."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from orchestrator.log import writer as writer_module
from orchestrator.log.layout import hour_file_name
from orchestrator.log.query import LogQuery, query_lines
from orchestrator.log.writer import LogWriter, redact_text, repair_torn_tail
from runtime import messages as m

MakeEnvelope = Callable[..., m.Envelope]
decoder = msgspec.json.Decoder(m.Envelope)


def lines_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "a file ends with a whole line"
    return data.splitlines()


def wait_for(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def new_writer(tmp_path: Path) -> Iterator[Callable[..., LogWriter]]:
    """Starts writers on ``tmp_path/logs`` (simulated times are old: no age retention)
    and closes them after the test."""
    started: list[LogWriter] = []

    def make(**options: object) -> LogWriter:
        options.setdefault("retain_days", 100_000)
        writer = LogWriter(tmp_path / "logs", **options)  # type: ignore[arg-type]
        writer.start()
        started.append(writer)
        return writer

    yield make
    for writer in started:
        writer.close()


def test_one_file_per_utc_hour_and_lines_decode_back(
    new_writer: Callable[..., LogWriter], make_envelope: MakeEnvelope, base_ts: float
) -> None:
    writer = new_writer()
    sent = [
        make_envelope(
            "user.in", m.UserTurn(text=f"turn {i}"), ts=base_ts + i * 900, sender="client"
        )
        for i in range(12)  # 15 minutes apart: three hours
    ]
    for env in sent:
        writer.append(env)
    writer.close()
    names = sorted(p.name for p in writer.log_dir.glob("*.jsonl"))
    assert names == ["2025-01-15T10.jsonl", "2025-01-15T11.jsonl", "2025-01-15T12.jsonl"]
    got = [decoder.decode(line) for name in names for line in lines_of(writer.log_dir / name)]
    assert got == sent
    assert writer.written == 12 and writer.failed == 0 and writer.last_error is None
    first = msgspec.json.decode(lines_of(writer.log_dir / names[0])[0])
    assert first["topic"] == "user.in" and first["body"]["type"] == "UserTurn"


def test_lines_reach_the_file_within_the_flush_interval_without_close(
    new_writer: Callable[..., LogWriter], make_envelope: MakeEnvelope
) -> None:
    writer = new_writer()  # the default flush_s, 200 ms
    now = time.time()
    started = time.monotonic()
    writer.append(make_envelope("heartbeat.coder", m.Heartbeat(state="idle"), ts=now))
    path = writer.log_dir / hour_file_name(now)
    wait_for(lambda: path.exists() and path.stat().st_size > 0, timeout=2)
    assert time.monotonic() - started < 0.6
    assert len(lines_of(path)) == 1


def test_close_flushes_everything_queued(
    new_writer: Callable[..., LogWriter], make_envelope: MakeEnvelope, base_ts: float
) -> None:
    writer = new_writer(flush_s=60)  # only close can flush
    for i in range(1000):
        writer.append(make_envelope("engine.stats", _stats(), ts=base_ts + i, sender="engine"))
    writer.close()
    assert len(lines_of(writer.log_dir / hour_file_name(base_ts))) == 1000
    assert writer.written == 1000


def _stats() -> m.EngineStats:
    return m.EngineStats(
        tokens_per_s=50.0,
        sessions=1,
        active_requests=0,
        cache_fill=0.5,
        device="cpu",
        resident_mb=300.0,
    )


def test_torn_tail_is_skipped_by_readers_with_a_warning_and_cut_by_the_writer(
    tmp_path: Path,
    new_writer: Callable[..., LogWriter],
    make_envelope: MakeEnvelope,
    base_ts: float,
) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    path = log_dir / hour_file_name(base_ts)
    whole = [
        msgspec.json.encode(make_envelope("user.in", m.UserTurn(text=str(i)), ts=base_ts + i))
        for i in range(3)
    ]
    torn = msgspec.json.encode(make_envelope("user.in", m.UserTurn(text="cut"), ts=base_ts + 9))
    path.write_bytes(b"".join(line + b"\n" for line in whole) + torn[:40])

    warnings: list[str] = []
    got = list(query_lines(log_dir, LogQuery(), warn=warnings.append))
    assert sorted(got) == sorted(whole)
    assert len(warnings) == 1 and "incomplete last line" in warnings[0]

    with capture_logs() as logs:
        writer = new_writer()
    assert any(e["event"] == "log_torn_tail_repaired" for e in logs)
    assert path.read_bytes() == b"".join(line + b"\n" for line in whole)
    writer.append(make_envelope("user.in", m.UserTurn(text="after"), ts=base_ts + 10))
    writer.close()
    assert len(lines_of(path)) == 4


def test_repair_torn_tail_cuts_to_the_last_newline(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":')
    assert repair_torn_tail(path) == 5
    assert path.read_bytes() == b'{"a":1}\n'
    assert repair_torn_tail(path) == 0
    path.write_bytes(b"no newline at all")
    assert repair_torn_tail(path) == len(b"no newline at all")
    assert path.read_bytes() == b""


class _DiskFull:
    """Stands in for ``os.write``: after ``allow`` bytes the disk is full."""

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.full = True

    def __call__(self, fd: int, data: memoryview | bytes) -> int:
        if not self.full:
            return _real_write(fd, data)
        if self.allow <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = _real_write(fd, bytes(data[: self.allow]))
        self.allow -= n
        return n


_real_write = writer_module._os_write


def test_disk_full_is_counted_reported_once_and_survived(
    monkeypatch: pytest.MonkeyPatch,
    new_writer: Callable[..., LogWriter],
    make_envelope: MakeEnvelope,
    base_ts: float,
) -> None:
    faults: list[str] = []
    disk = _DiskFull(allow=300)  # part of a line gets through, then ENOSPC
    monkeypatch.setattr(writer_module, "_os_write", disk)
    writer = new_writer(flush_s=0.02, on_fault=faults.append)

    def turn(i: int) -> m.Envelope:
        return make_envelope("user.in", m.UserTurn(text=f"turn {i:04d}"), ts=base_ts + i)

    for i in range(50):
        writer.append(turn(i))
    wait_for(lambda: writer.written + writer.failed == 50)
    for i in range(50, 80):  # still full: a second failure, not a second report
        writer.append(turn(i))
    wait_for(lambda: writer.written + writer.failed == 80)
    assert writer.failed >= 70
    assert writer.last_error is not None and "No space left" in writer.last_error
    assert "errno 28" in writer.last_error
    assert len(faults) == 1 and "No space left" in faults[0]
    assert writer._thread.is_alive()

    disk.full = False  # space again
    for i in range(80, 100):
        writer.append(turn(i))
    writer.close()
    path = writer.log_dir / hour_file_name(base_ts)
    kept = [decoder.decode(line) for line in lines_of(path)]  # only whole lines
    assert writer.written == len(kept) and writer.written + writer.failed == 100
    assert [e.body for e in kept[-20:]] == [turn(i).body for i in range(80, 100)]


def test_a_failing_fault_callback_does_not_stop_the_log(
    monkeypatch: pytest.MonkeyPatch,
    new_writer: Callable[..., LogWriter],
    make_envelope: MakeEnvelope,
    base_ts: float,
) -> None:
    def explode(message: str) -> None:
        raise RuntimeError("callback broke")

    def no_open(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "_os_open", no_open)
    writer = new_writer(flush_s=0.02, on_fault=explode)
    writer.append(make_envelope("user.in", m.UserTurn(text="x"), ts=base_ts))
    wait_for(lambda: writer.failed == 1)
    monkeypatch.undo()
    writer.append(make_envelope("user.in", m.UserTurn(text="y"), ts=base_ts + 1))
    writer.close()
    assert writer.written == 1


def test_redact_replaces_user_and_narrator_text_with_hash_and_length(
    new_writer: Callable[..., LogWriter], make_envelope: MakeEnvelope, base_ts: float
) -> None:
    writer = new_writer(redact=True)
    secret, spoken = "my card is 4111 1111", "Sure, here it is"
    writer.append(make_envelope("user.in", m.UserTurn(text=secret), ts=base_ts, sender="client"))
    writer.append(
        make_envelope(
            "user.out", m.Chunk(stream="s1", seq=0, delta=spoken), ts=base_ts + 1, sender="narrator"
        )
    )
    writer.append(make_envelope("heartbeat.rag", m.Heartbeat(state="busy"), ts=base_ts + 2))
    result = m.TaskUpdate(
        task="t1",
        state="result",
        message=f"you said {secret}",
        data={"echo": secret, "lines": [secret], "n": 3, "nested": {"x": secret}},
    )
    writer.append(make_envelope("task.update", result, ts=base_ts + 3, sender="coder"))
    cue = m.Cue(speak_now=True, priority=1, reason="r", cover=[secret], attachments=[secret])
    writer.append(make_envelope("narrator.cue", cue, ts=base_ts + 4, sender="controller"))
    writer.close()
    path = writer.log_dir / hour_file_name(base_ts)
    raw = path.read_bytes()
    assert secret.encode() not in raw and spoken.encode() not in raw
    assert b"4111" not in raw  # not even in agent results or cues
    turn, chunk, beat, update, cue_line = (decoder.decode(line) for line in lines_of(path))
    assert isinstance(update.body, m.TaskUpdate) and update.body.state == "result"
    assert update.body.data["n"] == 3 and update.body.task == "t1"
    assert update.body.data["lines"] == [redact_text(secret)]
    assert isinstance(cue_line.body, m.Cue) and cue_line.body.cover == [redact_text(secret)]
    assert isinstance(turn.body, m.UserTurn) and isinstance(chunk.body, m.Chunk)
    assert turn.body.text == redact_text(secret)
    assert (
        turn.body.text.startswith("<redacted sha256:") and f"len={len(secret)}>" in turn.body.text
    )
    assert chunk.body.delta == redact_text(spoken) and chunk.body.stream == "s1"
    assert beat.body == m.Heartbeat(state="busy")


def test_redact_with_a_key_is_an_hmac() -> None:
    assert redact_text("hi", b"k1") != redact_text("hi", b"k2")
    assert redact_text("hi", b"k1").startswith("<redacted hmac-sha256:")
    assert redact_text("hi") == redact_text("hi")


def test_a_line_torn_by_another_hand_is_reported_and_ours_stay_whole(
    new_writer: Callable[..., LogWriter], make_envelope: MakeEnvelope, base_ts: float
) -> None:
    writer = new_writer(flush_s=0.05)
    first = make_envelope("user.in", m.UserTurn(text="before"), ts=base_ts)
    writer.append(first)
    path = writer.log_dir / hour_file_name(base_ts)
    wait_for(lambda: path.exists() and path.stat().st_size > 0)
    with path.open("ab") as f:  # while the writer holds the file open
        f.write(b'{"id": "torn-by-hand", "topic": "user.o')
    after = make_envelope("user.in", m.UserTurn(text="after"), ts=base_ts + 1)
    with capture_logs() as logs:
        writer.append(after)
        writer.close()
    lines = lines_of(path)
    assert lines[1] == b'{"id": "torn-by-hand", "topic": "user.o'  # theirs, on its own line
    assert [decoder.decode(line) for line in (lines[0], lines[2])] == [first, after]
    [event] = [e for e in logs if e["event"] == "log_foreign_write"]
    assert event["torn"] is True and event["bytes"] == 39
