"""Queries over the bus log: every filter against a plain reference, order, limit,
follow across rotation, the CLI."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.log import query as q
from orchestrator.log.layout import HOUR_S, hour_file_name
from orchestrator.log.query import LogQuery, follow_lines, parse_time, query_lines
from orchestrator.log.writer import LogWriter
from runtime import messages as m

MakeEnvelope = Callable[..., m.Envelope]
WriteLog = Callable[[Path, Iterable[m.Envelope]], None]
Action = Literal["spoken", "held", "coalesced", "preempted", "dropped"]
REPO = Path(__file__).resolve().parents[2]
decoder = msgspec.json.Decoder(m.Envelope)


def dataset(make: MakeEnvelope, base: float) -> list[m.Envelope]:
    """Three hours of mixed traffic, one envelope every 20 s, in ts order."""
    out: list[m.Envelope] = []
    for i in range(540):
        ts = base + 20 * i
        conv = ("c1", "c2", None)[i % 3]
        task = f"t{i % 5}" if i % 2 else None
        match i % 9:
            case 0:
                text = ("Hello Café", "find the REPORT", "ünïcode ok")[i % 27 // 9]
                env = make("user.in", m.UserTurn(text=text), ts=ts, sender="client")
            case 1:
                chunk = m.Chunk(stream="s", seq=i, delta=f"word{i} ")
                env = make("user.out", chunk, ts=ts, sender="narrator")
            case 2:
                assign = m.TaskAssign(task=f"t{i % 5}", kind="code", text="write a report")
                env = make("task.assign.coder", assign, ts=ts, task=task)
            case 3:
                update = m.TaskUpdate(task=f"t{i % 5}", state="progress", message=f"step {i}")
                env = make("task.update", update, ts=ts, sender="coder", task=task)
            case 4:
                env = make("heartbeat.search", m.Heartbeat(state="idle"), ts=ts, sender="search")
            case 5:
                actions: tuple[Action, ...] = ("spoken", "held", "dropped")
                decision = m.Decision(action=actions[i % 27 // 9], reason=f"because {i}")
                env = make("narrator.decision", decision, ts=ts, sender="narrator")
            case 6:
                # its body has a "topic" field too: a needle may find it, the filter must not
                rejected = m.Rejected(sender="coder", topic="task.update", reason="bad body")
                env = make("sys.rejected", rejected, ts=ts, sender="broker")
            case 7:
                env = make("event.coder", m.Note(name="lint", data={"msg": "Report"}), ts=ts)
            case _:
                env = make("engine.stats", _stats(), ts=ts, sender="engine")
        out.append(msgspec.structs.replace(env, conversation=conv))
    return out


def _stats() -> m.EngineStats:
    return m.EngineStats(
        tokens_per_s=9.5,
        sessions=1,
        active_requests=0,
        cache_fill=0.1,
        device="cpu",
        resident_mb=1.0,
    )


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def reference(envs: list[m.Envelope], query: LogQuery) -> list[m.Envelope]:
    """What a query must return, computed the slow and obvious way."""
    out = []
    for e in envs:
        if query.since is not None and e.ts < query.since:
            continue
        if query.until is not None and e.ts >= query.until:
            continue
        if query.topics and not any(e.topic.startswith(t) for t in query.topics):
            continue
        if query.senders and e.sender not in query.senders:
            continue
        if query.conversation is not None and e.conversation != query.conversation:
            continue
        if query.task is not None and e.task != query.task:
            continue
        if query.text is not None:
            body = msgspec.to_builtins(e.body)
            if not any(query.text.casefold() in s.casefold() for s in _strings(body)):
                continue
        out.append(e)
    if query.newest_first:
        out.reverse()
    return out[: query.limit] if query.limit is not None else out


def run(log_dir: Path, query: LogQuery, warnings: list[str] | None = None) -> list[m.Envelope]:
    sink = warnings if warnings is not None else []
    return [decoder.decode(line) for line in query_lines(log_dir, query, warn=sink.append)]


@pytest.fixture
def logged(
    tmp_path: Path, make_envelope: MakeEnvelope, write_log: WriteLog, base_ts: float
) -> tuple[Path, list[m.Envelope]]:
    envs = dataset(make_envelope, base_ts)
    write_log(tmp_path, envs)
    return tmp_path, envs


B = 1736935200.0  # base_ts, for parametrize

FILTERS: dict[str, LogQuery] = {
    "all": LogQuery(),
    "time range across hours": LogQuery(since=B + 1800, until=B + 2 * HOUR_S + 600),
    "time range inside one hour": LogQuery(since=B + 615, until=B + 1207.5),
    "topic prefix": LogQuery(topics=("task.",)),
    "exact topic": LogQuery(topics=("task.update",)),
    "two topics": LogQuery(topics=("user.", "narrator.")),
    "sender": LogQuery(senders=("narrator",)),
    "two senders": LogQuery(senders=("client", "engine")),
    "conversation": LogQuery(conversation="c2"),
    "task": LogQuery(task="t3"),
    "text, any case": LogQuery(text="report"),
    "text, not ASCII": LogQuery(text="CAFÉ"),
    "text with a quote": LogQuery(text='"'),
    "everything at once": LogQuery(
        since=B + 600, until=B + 3 * HOUR_S, topics=("task.",), conversation="c1", task="t1"
    ),
    "newest first with a limit": LogQuery(topics=("user.in",), newest_first=True, limit=7),
    "oldest first with a limit": LogQuery(senders=("coder",), limit=5),
    "limit zero": LogQuery(limit=0),
}


@pytest.mark.parametrize("name", FILTERS)
def test_each_filter_returns_what_the_reference_does(
    logged: tuple[Path, list[m.Envelope]], name: str
) -> None:
    log_dir, envs = logged
    query = FILTERS[name]
    expected = reference(envs, query)
    assert run(log_dir, query) == expected
    if name not in ("limit zero", "text with a quote"):
        assert expected, "each case should select something"


def test_a_body_field_named_like_an_envelope_field_does_not_match(
    logged: tuple[Path, list[m.Envelope]],
) -> None:
    log_dir, _ = logged
    got = run(log_dir, LogQuery(topics=("task.update",)))
    assert got and {e.topic for e in got} == {"task.update"}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    since=st.none() | st.floats(B - 100, B + 3 * HOUR_S + 100),
    span=st.none() | st.floats(0, 3 * HOUR_S),
    topics=st.lists(st.sampled_from(["user.", "task.", "task.update", "sys", "e"]), max_size=2),
    senders=st.lists(st.sampled_from(["client", "coder", "narrator", "broker"]), max_size=2),
    conversation=st.none() | st.sampled_from(["c1", "c2"]),
    task=st.none() | st.sampled_from(["t1", "t2"]),
    text=st.none() | st.sampled_from(["report", "WORD1", "é", "step 1"]),
    newest_first=st.booleans(),
    limit=st.none() | st.integers(0, 30),
)
def test_any_combination_of_filters_matches_the_reference(
    logged: tuple[Path, list[m.Envelope]],
    since: float | None,
    span: float | None,
    topics: list[str],
    senders: list[str],
    conversation: str | None,
    task: str | None,
    text: str | None,
    newest_first: bool,
    limit: int | None,
) -> None:
    log_dir, envs = logged
    until = None if since is None or span is None else since + span
    query = LogQuery(
        since=since,
        until=until,
        topics=tuple(topics),
        senders=tuple(senders),
        conversation=conversation,
        task=task,
        text=text,
        newest_first=newest_first,
        limit=limit,
    )
    assert run(log_dir, query) == reference(envs, query)


def test_files_outside_the_time_range_are_not_opened(
    logged: tuple[Path, list[m.Envelope]], base_ts: float
) -> None:
    log_dir, envs = logged
    garbage = log_dir / hour_file_name(base_ts - 5 * HOUR_S)
    garbage.write_bytes(b"this is not json\n")
    warnings: list[str] = []
    assert run(log_dir, LogQuery(since=base_ts), warnings) == envs
    assert warnings == []
    assert run(log_dir, LogQuery(), warnings) == envs  # now it is read: one warning
    assert len(warnings) == 1 and "not an envelope" in warnings[0]


def test_small_blocks_give_the_same_answer(
    logged: tuple[Path, list[m.Envelope]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines cross block edges when blocks are smaller than lines."""
    log_dir, envs = logged
    for query in (LogQuery(topics=("task.",)), LogQuery(newest_first=True, text="report")):
        expected = run(log_dir, query)
        monkeypatch.setattr(q, "_CHUNK", 97)
        assert run(log_dir, query) == expected == reference(envs, query)
        monkeypatch.undo()


def test_follow_prints_the_tail_then_new_lines_across_hour_rotation(
    tmp_path: Path, make_envelope: MakeEnvelope, base_ts: float
) -> None:
    log_dir = tmp_path / "logs"
    writer = LogWriter(log_dir, flush_s=0.02, retain_days=100_000)
    writer.start()
    try:
        earlier = [
            make_envelope("user.in", m.UserTurn(text=f"old {i}"), ts=base_ts + i) for i in range(5)
        ]
        for env in earlier:
            writer.append(env)
        path = log_dir / hour_file_name(base_ts)
        deadline = time.monotonic() + 3
        while writer.written < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        later = [
            make_envelope("user.in", m.UserTurn(text=f"new {h}"), ts=base_ts + h * HOUR_S + 10)
            for h in range(3)  # this hour, the next, the one after
        ]

        def produce() -> None:
            time.sleep(0.1)
            for env in later:
                writer.append(make_envelope("heartbeat.x", m.Heartbeat(state="idle"), ts=env.ts))
                writer.append(env)
                time.sleep(0.1)

        producer = threading.Thread(target=produce)
        producer.start()
        got: list[m.Envelope] = []
        query = LogQuery(topics=("user.",), limit=2)
        for line in follow_lines(
            log_dir, query, poll_s=0.02, follow_for=10, stop=lambda: len(got) >= 5
        ):
            got.append(decoder.decode(line))
        producer.join()
    finally:
        writer.close()
    assert path.exists()
    assert got == [*earlier[-2:], *later]


def _args(data_dir: Path, **options: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    q.add_arguments(parser)
    args = parser.parse_args([])
    args.data_dir = data_dir
    for key, value in options.items():
        setattr(args, key, value)
    return args


def test_cli_json_prints_the_stored_lines(
    tmp_path: Path,
    make_envelope: MakeEnvelope,
    write_log: WriteLog,
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = time.time()
    envs = [
        make_envelope("task.update", _update(i), ts=now - 570 + i * 60, task=f"t{i}")
        for i in range(10)
    ]
    write_log(tmp_path / "logs", envs)
    code = q.run_logs(_args(tmp_path, json=True, since="5m", topic=["task."]))
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert [decoder.decode(line) for line in out] == [
        e for e in reversed(envs) if e.ts >= now - 300
    ]


def _update(i: int) -> m.TaskUpdate:
    return m.TaskUpdate(task=f"t{i}", state="progress", message=f"step {i}")


def test_cli_table_is_plain_when_not_a_terminal(
    in_logs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = q.run_logs(_args(in_logs_dir, oldest=True, limit=3, sender=["client"]))
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "TOPIC", "SENDER", "CONVERSATION", "TASK", "BODY"]
    assert len(lines) == 4
    assert lines[1].startswith("2025-01-15 10:00:00.000Z  user.in")
    assert "Hello Café" in lines[1]


@pytest.fixture
def in_logs_dir(logged: tuple[Path, list[m.Envelope]], tmp_path: Path) -> Path:
    """The dataset under ``<data>/logs``, for the CLI."""
    log_dir, _ = logged
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    for f in log_dir.glob("*.jsonl"):
        f.rename(data / "logs" / f.name)
    return data


def test_cli_table_on_a_terminal_uses_rich(
    in_logs_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert q.run_logs(_args(in_logs_dir, limit=250, oldest=True)) == 0
    out = capsys.readouterr().out
    assert "\x1b[" in out  # styled
    assert "user.in" in out and "Hello Café" in out
    assert out.count("\x1b[1mtopic") == 1  # one header, over two printed batches


def test_cli_follow_prints_history_then_stops_after_follow_for(
    in_logs_dir: Path,
    logged: tuple[Path, list[m.Envelope]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, envs = logged
    args = _args(in_logs_dir, follow=True, follow_for=0.3, json=True, limit=3, sender=["engine"])
    started = time.monotonic()
    assert q.run_logs(args) == 0
    assert 0.3 <= time.monotonic() - started < 3
    got = [decoder.decode(line) for line in capsys.readouterr().out.splitlines()]
    assert got == [e for e in envs if e.sender == "engine"][-3:]


def test_cli_rejects_a_bad_time_with_a_message(
    in_logs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert q.run_logs(_args(in_logs_dir, since="yesterday-ish")) == 2
    err = capsys.readouterr().err
    assert "cannot read the time 'yesterday-ish'" in err and "10m" in err
    assert q.run_logs(_args(in_logs_dir, follow=True, until="1h")) == 2


def test_decisions_lists_narrator_decisions_with_an_action_filter(
    in_logs_dir: Path,
    logged: tuple[Path, list[m.Envelope]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, envs = logged
    parser = argparse.ArgumentParser()
    q.add_decision_arguments(parser)
    args = parser.parse_args(["--action", "held", "--json", "--oldest"])
    args.data_dir = in_logs_dir
    assert q.run_decisions(args) == 0
    got = [decoder.decode(line) for line in capsys.readouterr().out.splitlines()]
    expected = [e for e in envs if isinstance(e.body, m.Decision) and e.body.action == "held"]
    assert got == expected and expected

    args = parser.parse_args(["--limit", "2"])
    args.data_dir = in_logs_dir
    assert q.run_decisions(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "SENDER", "ACTION"] and len(lines) == 3


def test_python_m_query_runs_as_a_command(in_logs_dir: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.log.query",
            "--data-dir",
            str(in_logs_dir),
            "--topic",
            "user.out",
            "--limit",
            "3",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=30,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(decoder.decode(x).topic == "user.out" for x in lines)
    assert result.stderr == b""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", 1000.0 - 600),
        ("1h30m", 1000.0 - 5400),
        ("2d", 1000.0 - 172800),
        ("now", 1000.0),
        ("1736935200", 1736935200.0),
        ("2025-01-15T10:00", 1736935200.0),
        ("2025-01-15T10:00:00Z", 1736935200.0),
        ("2025-01-15T12:00+02:00", 1736935200.0),
    ],
)
def test_parse_time_forms(text: str, expected: float) -> None:
    assert parse_time(text, now=1000.0) == expected


def test_parse_time_says_what_it_takes() -> None:
    with pytest.raises(ValueError, match="10m"):
        parse_time("soon")
