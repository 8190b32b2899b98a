"""Retention by age and size, gzip of closed hours, and the minute index."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec
from structlog.testing import capture_logs

from orchestrator.log.index import build_index, byte_range, read_index
from orchestrator.log.layout import HOUR_S, hour_file_name, list_log_files
from orchestrator.log.query import LogQuery, query_lines
from orchestrator.log.retention import apply_retention, compress_closed, index_closed
from orchestrator.log.writer import LogWriter
from runtime import messages as m

MakeEnvelope = Callable[..., m.Envelope]
WriteLog = Callable[[Path, Iterable[m.Envelope]], None]
MIB = 1 << 20


def fill_hours(log_dir: Path, base_ts: float, hours: int, size: int) -> list[str]:
    """``hours`` hour files of ``size`` bytes each, oldest first."""
    log_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for h in range(hours):
        name = hour_file_name(base_ts + h * HOUR_S)
        (log_dir / name).write_bytes(b"x" * (size - 1) + b"\n")
        names.append(name)
    return names


def test_size_limit_deletes_oldest_first_and_keeps_the_newest(
    tmp_path: Path, base_ts: float
) -> None:
    names = fill_hours(tmp_path, base_ts, hours=30, size=100_000)  # ~2.9 MiB
    now = base_ts + 30 * HOUR_S
    report = apply_retention(tmp_path, retain_mb=1, retain_days=365, now=now, keep={names[-1]})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == names[-10:]  # ten files of 100 kB fit in 1 MiB, eleven do not
    assert report.deleted == names[:20]
    assert report.freed_bytes == 20 * 100_000
    assert report.total_bytes <= MIB


def test_the_file_being_written_is_never_deleted_even_over_the_limit(
    tmp_path: Path, base_ts: float
) -> None:
    names = fill_hours(tmp_path, base_ts, hours=3, size=MIB)
    current = names[-1]
    apply_retention(tmp_path, retain_mb=0.5, now=base_ts + 3 * HOUR_S, keep={current})
    assert [p.name for p in tmp_path.iterdir()] == [current]


def test_age_limit_deletes_hours_that_ended_before_it(tmp_path: Path, base_ts: float) -> None:
    names = fill_hours(tmp_path, base_ts, hours=48, size=10)
    now = base_ts + 48 * HOUR_S  # the end of the last hour
    report = apply_retention(tmp_path, retain_days=1, now=now)
    assert report.deleted == names[:24]
    assert sorted(p.name for p in tmp_path.iterdir()) == names[24:]


def test_writer_applies_retention_at_start_and_keeps_its_current_file(
    tmp_path: Path,
    base_ts: float,
    make_envelope: MakeEnvelope,
) -> None:
    log_dir = tmp_path / "logs"
    now = base_ts + 20 * HOUR_S
    names = fill_hours(log_dir, base_ts, hours=20, size=200_000)
    writer = LogWriter(log_dir, retain_mb=1, clock=lambda: now)
    writer.append(make_envelope("user.in", m.UserTurn(text="hi"), ts=now))
    writer.start()
    writer.close()
    report = writer.maintain(now=now)  # the start pass ran in the background; this one is idle
    assert report.deleted == []
    left = sorted(p.name for p in log_dir.glob("*.jsonl"))
    assert left[-1] == hour_file_name(now)
    assert left[:-1] == names[-5:]  # 5 × 200 kB plus the new file fit in 1 MiB


def test_closed_hours_are_gzipped_and_read_transparently(
    tmp_path: Path, base_ts: float, make_envelope: MakeEnvelope, write_log: WriteLog
) -> None:
    envs = [
        make_envelope("task.update", _update(f"t{i}"), ts=base_ts + i * 600, task=f"t{i}")
        for i in range(12)  # two hours
    ]
    write_log(tmp_path, envs)
    first, second = hour_file_name(base_ts), hour_file_name(base_ts + HOUR_S)
    # the second hour ended 100 s ago: inside the grace period, and it is kept anyway
    now = base_ts + 2 * HOUR_S + 100
    report = compress_closed(tmp_path, now=now, after_s=60, keep={second})
    assert report.compressed == [first]
    assert sorted(p.name for p in tmp_path.iterdir()) == [first + ".gz", second]
    got = [
        msgspec.json.decode(line)["task"]
        for line in query_lines(tmp_path, LogQuery(newest_first=True))
    ]
    assert got == [f"t{i}" for i in reversed(range(12))]

    # a late line for the compressed hour lands in a plain file, then joins the .gz
    late = make_envelope("task.update", _update("late"), ts=base_ts + 5, task="late")
    write_log(tmp_path, [late])
    oldest = list(query_lines(tmp_path, LogQuery(limit=7)))
    assert [msgspec.json.decode(x)["task"] for x in oldest][-1] == "late"
    compress_closed(tmp_path, now=now, after_s=60, keep={second})
    assert not (tmp_path / first).exists()
    with gzip.open(tmp_path / (first + ".gz"), "rb") as gz:
        assert len(gz.read().splitlines()) == 7  # two gzip members read as one
    newest = list(
        query_lines(tmp_path, LogQuery(until=base_ts + HOUR_S, limit=2, newest_first=True))
    )
    assert [msgspec.json.decode(x)["task"] for x in newest] == ["late", "t5"]


def _update(message: str) -> m.TaskUpdate:
    return m.TaskUpdate(task=message, state="progress", message=message)


def test_minute_index_gives_the_byte_range_of_a_time_range(
    tmp_path: Path, base_ts: float, make_envelope: MakeEnvelope, write_log: WriteLog
) -> None:
    # one line every 10 s, and one late line (ts 00:30) written after 00:50
    envs = [
        make_envelope("heartbeat.coder", m.Heartbeat(state="idle"), ts=base_ts + 10 * i)
        for i in range(360)
    ]
    late = make_envelope("heartbeat.coder", m.Heartbeat(state="busy"), ts=base_ts + 30 * 60)
    envs.insert(300, late)
    write_log(tmp_path, envs)
    path = tmp_path / hour_file_name(base_ts)
    index_closed(tmp_path, now=base_ts + 2 * HOUR_S)
    f = list_log_files(tmp_path)[0]
    index = read_index(f.index_path, path.stat().st_size)
    assert index is not None and index == build_index(path, base_ts)

    since, until = base_ts + 20 * 60, base_ts + 40 * 60
    start, end = byte_range(index, base_ts, since, until)
    data = path.read_bytes()
    assert 0 < start < end < len(data) and data[start - 1 : start] == b"\n"
    in_range = [line for line in data[start:end].splitlines()]
    exact = [e for e in envs if since <= e.ts < until]
    decoded = [msgspec.json.decode(line, type=m.Envelope) for line in in_range]
    assert all(e in decoded for e in exact) and late in decoded
    assert end - start < len(data) * 0.9  # the late line widens the range, no more

    got = list(query_lines(tmp_path, LogQuery(since=since, until=until)))
    assert [msgspec.json.decode(x, type=m.Envelope) for x in got] == [
        e for e in envs if since <= e.ts < until
    ]


def an_hour_of_heartbeats(
    log_dir: Path, base_ts: float, make_envelope: MakeEnvelope, write_log: WriteLog
) -> list[m.Envelope]:
    """One heartbeat a minute for the hour from ``base_ts``, written to ``log_dir``."""
    envs = [
        make_envelope("heartbeat.coder", m.Heartbeat(state="idle"), ts=base_ts + 60 * i)
        for i in range(60)
    ]
    write_log(log_dir, envs)
    return envs


def test_a_stale_index_is_ignored(
    tmp_path: Path, base_ts: float, make_envelope: MakeEnvelope, write_log: WriteLog
) -> None:
    envs = an_hour_of_heartbeats(tmp_path, base_ts, make_envelope, write_log)
    index_closed(tmp_path, now=base_ts + 2 * HOUR_S)
    late = make_envelope("heartbeat.coder", m.Heartbeat(state="busy"), ts=base_ts + 90)
    write_log(tmp_path, [late])  # appended after indexing: the index no longer fits
    since, until = base_ts + 60, base_ts + 120
    got = list(query_lines(tmp_path, LogQuery(since=since, until=until)))
    assert [msgspec.json.decode(x, type=m.Envelope) for x in got] == [envs[1], late]
    assert index_closed(tmp_path, now=base_ts + 2 * HOUR_S).indexed == [hour_file_name(base_ts)]


def test_the_index_pass_counts_and_reports_lines_damaged_on_disk(
    tmp_path: Path, base_ts: float, make_envelope: MakeEnvelope, write_log: WriteLog
) -> None:
    an_hour_of_heartbeats(tmp_path, base_ts, make_envelope, write_log)
    path = tmp_path / hour_file_name(base_ts)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = b"\xff\x00{]\x01\x02\x03\x04"  # two lines' worth at most
    path.write_bytes(bytes(data))
    with capture_logs() as logs:
        index_closed(tmp_path, now=base_ts + 2 * HOUR_S)
    [event] = [e for e in logs if e["event"] == "log_lines_unreadable"]
    assert event["file"] == path.name and 1 <= event["lines"] <= 2
    index = read_index(list_log_files(tmp_path)[0].index_path, len(data))
    assert index is not None and index.unreadable == event["lines"]
    with capture_logs() as logs:  # indexed once: said once
        index_closed(tmp_path, now=base_ts + 2 * HOUR_S)
    assert not [e for e in logs if e["event"] == "log_lines_unreadable"]
