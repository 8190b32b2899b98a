"""Shadow launch and canary rollout of the narrator (docs/rollout.md).

The canary's arithmetic (buckets, rates, thresholds, the saved phase) is tested pure;
the shadow and a deliberately failing canary run as real processes on a real broker,
the canary with a tiny random-weight engine so that the baseline really answers.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
from transformers import PreTrainedTokenizerFast

from orchestrator.__main__ import build_parser, voices
from orchestrator.canary import (
    REPORT_EVERY_S,
    Canary,
    Policy,
    Voice,
    bucket,
    load_phase,
    parse_sampling,
    save_phase,
)
from orchestrator.log.compare import compare, summary
from orchestrator.log.query import LogQuery, query_envelopes
from runtime import cli
from runtime import messages as m
from runtime.embed import Runtime
from runtime.errors import ConfigError
from runtime.keys import ensure_keys
from runtime.paths import DataDir
from runtime.settings import Settings
from tests.engine.conftest import serving_tiny, tiny_tokenizer  # noqa: F401 (a fixture)
from tests.orchestrator.conftest import MakeEnvelope, WriteLog


def conversations(on_candidate: bool, percent: float, n: int) -> list[str]:
    """``n`` conversation ids that a canary at ``percent`` puts on (or off) the candidate."""
    found: list[str] = []
    i = 0
    while len(found) < n:
        cid = f"conv-{i}"
        if (bucket(cid) < percent) == on_candidate:
            found.append(cid)
        i += 1
    return found


# -- the canary's arithmetic -------------------------------------------------------------


def test_buckets_are_stable_spread_and_a_larger_percent_keeps_the_candidates_it_had() -> None:
    ids = [f"c{i}" for i in range(4000)]
    assert [bucket(c) for c in ids[:50]] == [bucket(c) for c in ids[:50]]
    assert all(0 <= bucket(c) < 100 for c in ids)
    share = sum(bucket(c) < 25 for c in ids) / len(ids)
    assert 0.22 < share < 0.28, share
    canary = Canary(Policy(percent=5))
    at5 = {c for c in ids if canary.arm_for(c) == "candidate"}
    canary.set_percent(25)
    at25 = {c for c in ids if canary.arm_for(c) == "candidate"}
    assert at5 < at25


def test_the_candidate_is_rolled_back_only_after_the_minimum_sample() -> None:
    canary = Canary(Policy(percent=50, min_samples=3, max_error_delta=0.1))
    for _ in range(3):
        assert canary.record("baseline", error=False, first_token_s=0.2) is None
    assert canary.record("candidate", error=True) is None
    assert canary.record("candidate", error=True) is None
    why = canary.record("candidate", error=False, first_token_s=0.2)
    assert why is not None and "error rate 67%" in why and "baseline's 0%" in why
    canary.roll_back()
    assert canary.share == 0 and canary.arm_for("anything") == "baseline"
    assert canary.verdict() is None  # judged once


def test_an_error_rate_within_the_margin_is_no_rollback() -> None:
    canary = Canary(Policy(percent=50, min_samples=10, max_error_delta=0.1))
    for i in range(10):
        canary.record("baseline", error=i < 2, first_token_s=0.3)  # 20%
        canary.record("candidate", error=i < 3, first_token_s=0.3)  # 30%: within +10 points
    assert canary.verdict() is None
    canary.record("candidate", error=True)  # 4 of 11: 36%
    assert canary.verdict() is not None


def test_a_slow_first_token_rolls_back_and_a_baseline_without_samples_counts_as_error_free() -> (
    None
):
    canary = Canary(Policy(percent=50, min_samples=2, max_latency_ratio=1.5))
    for _ in range(2):
        canary.record("candidate", error=False, first_token_s=0.9)
    assert canary.verdict() is None  # no baseline latency to compare with yet
    canary.record("baseline", error=False, first_token_s=0.5)
    canary.record("baseline", error=False, first_token_s=0.7)
    why = canary.verdict()
    assert why is not None and "first token 0.90 s" in why and "0.60 s" in why
    lonely = Canary(Policy(percent=100, min_samples=2))
    lonely.record("candidate", error=True)
    assert lonely.record("candidate", error=True) is not None  # against none assumed


def test_promote_resume_percent_and_reports() -> None:
    canary = Canary(Policy(percent=5))
    canary.promote()
    assert canary.share == 100 and canary.arm_for("x") == "candidate"
    canary.roll_back()
    canary.record("candidate", error=True)
    canary.resume()
    assert canary.share == 5 and canary.records["candidate"].samples == 0
    with pytest.raises(ValueError):
        canary.set_percent(101)
    assert not canary.report_due()
    canary.reported -= REPORT_EVERY_S
    assert canary.report_due() and not canary.report_due()


def test_the_phase_is_kept_per_candidate(tmp_path: Path) -> None:
    path = tmp_path / "rollout.json"
    assert load_phase(path, "abc") == "running"
    save_phase(path, "abc", "rolled_back", "errors")
    assert load_phase(path, "abc") == "rolled_back"
    assert load_phase(path, "another") == "running"  # a new candidate starts afresh
    path.write_text("{torn")
    assert load_phase(path, "abc") == "running"


def test_voices_read_sampling_and_prompts_and_name_what_is_wrong(tmp_path: Path) -> None:
    assert parse_sampling("temperature=0.7, max_tokens=128") == {
        "temperature": 0.7,
        "max_tokens": 128,
    }
    for bad, says in (("temp=1", "KEY one of"), ("max_tokens=lots", "wants a int")):
        with pytest.raises(ValueError, match=says):
            parse_sampling(bad)
    prompt = tmp_path / "candidate.md"
    prompt.write_text("You are terse.\n{summary}\n")
    voice = Voice(prompt, "temperature=0.9,max_tokens=40")
    voice.check("--candidate-prompt")
    assert voice.system_prompt("Earlier: hi.") == "You are terse.\nEarlier: hi."
    from orchestrator.narrator import PROGRESS, SPEAK

    assert voice.params(SPEAK).max_tokens == 40 and voice.params(SPEAK).temperature == 0.9
    assert voice.params(PROGRESS, keep_length=True).max_tokens == PROGRESS.max_tokens
    plain = tmp_path / "plain.md"
    plain.write_text("Be kind.")
    assert Voice(plain).system_prompt("S.") == "Be kind.\nS."
    assert Voice(prompt).fingerprint() != Voice(plain).fingerprint()
    assert Voice(prompt).fingerprint() == Voice(prompt).fingerprint()
    with pytest.raises(ConfigError, match="cannot read the prompt"):
        Voice(tmp_path / "missing.md").check("--candidate-prompt")
    (tmp_path / "slots.md").write_text("Hi {user}")
    with pytest.raises(ConfigError, match=r"slots \['user'\]"):
        Voice(tmp_path / "slots.md").check("--candidate-prompt")
    with pytest.raises(ConfigError, match="top_p"):
        Voice(sampling="top_p=2").check("--candidate-sampling")


def test_launch_settings_become_narrator_and_shadow_flags_the_narrator_accepts(
    tmp_path: Path,
) -> None:
    prompt = tmp_path / "candidate.md"
    prompt.write_text("Be terse. {summary}")
    settings = Settings.load(
        candidate_prompt=prompt,
        candidate_sampling="temperature=0.9",
        shadow_narrator=True,
        canary_percent=5,
    )[0]
    narrator, shadow = cli.narrator_flags(settings)
    assert shadow == ("--prompt", str(prompt.resolve()), "--sampling", "temperature=0.9")
    args = build_parser().parse_args(["narrator", *narrator])
    voice, candidate, policy = voices(args)
    assert voice == Voice() and candidate == Voice(prompt.resolve(), "temperature=0.9")
    assert policy.percent == 5 and policy.min_samples == 20
    assert cli.narrator_flags(Settings.load()[0]) == ((), None)  # nothing asked, nothing added
    # the narrator forgets a quiet conversation when the engine evicts its session
    narrator, _ = cli.narrator_flags(Settings.load(engine_idle_s=60)[0])
    assert build_parser().parse_args(["narrator", *narrator]).forget_s == 60
    with pytest.raises(ConfigError, match="needs a candidate"):
        cli.narrator_flags(Settings.load(canary_percent=5)[0])
    with pytest.raises(ConfigError, match="cannot read the prompt"):
        cli.narrator_flags(Settings.load(candidate_prompt=tmp_path / "nope.md")[0])
    parsed = cli.build_parser().parse_args(["launch", "--shadow-narrator", "--shadow-prompt", "p"])
    assert parsed.shadow_narrator and parsed.candidate_prompt == Path("p")


# -- decisions --compare -----------------------------------------------------------------


def test_compare_joins_each_cue_with_both_streams_from_the_log(
    tmp_path: Path, make_envelope: MakeEnvelope, write_log: WriteLog, base_ts: float
) -> None:
    logs = tmp_path / "data" / "logs"
    cue = make_envelope(
        "narrator.cue",
        m.Cue(speak_now=True, priority=1, reason="turn", kind="answer"),
        ts=base_ts,
        conversation="c1",
    )
    again = msgspec.structs.replace(cue, ts=base_ts + 0.25)  # a re-send: same id
    lonely = make_envelope(
        "narrator.cue", m.Cue(speak_now=True, priority=1, reason="r"), ts=base_ts + 5
    )

    def chunk(sender: str, topic: str, seq: int, delta: str, at: float, **kw: object) -> m.Envelope:
        body = m.Chunk(stream=sender, seq=seq, delta=delta, cue=cue.id, **kw)  # type: ignore[arg-type]
        return make_envelope(topic, body, ts=base_ts + at, sender=sender, conversation="c1")

    write_log(
        logs,
        [
            cue,
            again,
            chunk("narrator", "user.out", 0, "Hello ", 0.5),
            chunk("narrator-shadow", "shadow.user.out", 0, "<redacted sha256:ab len=12>", 0.8),
            chunk("narrator", "user.out", 1, "there", 0.9),
            chunk("narrator", "user.out", 2, "", 1.0, final=True, finish="done"),
            chunk("narrator-shadow", "shadow.user.out", 1, "", 2.0, final=True, finish="error"),
            chunk("narrator-shadow", "user.out", 9, "never shown", 2.1),  # not the shadow's topic
            lonely,
        ],
    )
    rows = compare(logs, LogQuery())
    assert [r.cue for r in rows] == [cue.id, lonely.id]
    first = rows[0]
    assert first.narrator is not None and first.shadow is not None
    assert (first.narrator.first_s, first.narrator.total_s) == (0.5, 1.0)
    assert (first.narrator.chars, first.narrator.finish) == (11, "done")
    assert (first.shadow.first_s, first.shadow.chars, first.shadow.finish) == (0.8, 12, "error")
    assert rows[1].narrator is None and rows[1].shadow is None
    figures = summary(rows)
    assert figures["shadow"] == {
        "streams": 1,
        "errors": 1,
        "unfinished": 0,
        "first_s_median": 0.8,
        "total_s_median": 2.0,
        "chars_median": 12.0,
    }


def decisions(*argv: str) -> int:
    """``python -m runtime decisions …`` in this process (without configuring logging)."""
    args = cli.build_parser().parse_args(["decisions", *argv])
    code: int = args.func(args)
    return code


def test_decisions_compare_prints_a_table_and_json(
    tmp_path: Path,
    make_envelope: MakeEnvelope,
    write_log: WriteLog,
    base_ts: float,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "data"
    cue = make_envelope(
        "narrator.cue", m.Cue(speak_now=True, priority=1, reason="r"), ts=base_ts, conversation="c9"
    )
    done = m.Chunk(stream="s", seq=0, delta="Hi.", final=True, finish="done", cue=cue.id)
    said = make_envelope("user.out", done, ts=base_ts + 1, sender="narrator", conversation="c9")
    write_log(data / "logs", [cue, said])
    assert decisions("--compare", "--data-dir", str(data)) == 0
    out = capsys.readouterr().out
    assert "c9" in out and "1.00s / 1.00s" in out and "narrator: 1 of 1 cues" in out
    assert decisions("--compare", "--json", "--data-dir", str(data)) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["narrator"]["chars"] == 3 and lines[0]["shadow"] is None
    assert lines[-1]["summary"]["cues"] == 1


# -- real processes ----------------------------------------------------------------------


async def test_the_shadow_hears_the_same_cues_and_speaks_only_on_shadow_user_out(
    tmp_path: Path,
) -> None:
    data = DataDir(tmp_path / "data")
    prompt = tmp_path / "candidate.md"
    prompt.write_text("You are a terse candidate. {summary}")
    shadow_args = ("--prompt", str(prompt), "--sampling", "temperature=0.9")
    async with Runtime(data.root, agents={}, engine=False, shadow_args=shadow_args) as rt:
        with anyio.fail_after(60):
            for name in ("narrator", "narrator-shadow"):
                with rt.subscribe(f"heartbeat.{name}") as beats:
                    await anext(beats)
        everything = rt.subscribe("")
        said = [c async for c in rt.chat("hello!", conversation="c1")]
        assert said[-1].final and said[-1].closes_turn  # the user got the real answer
        shadow_done = False
        seen: list[m.Envelope] = []
        with anyio.fail_after(30):
            async for env in everything:
                seen.append(env)
                body = env.body
                if env.topic == "shadow.user.out" and isinstance(body, m.Chunk) and body.final:
                    shadow_done = True
                    break
        with anyio.move_on_after(1):  # what else the shadow might send
            async for env in everything:
                seen.append(env)
        assert shadow_done
        cues = {e.id for e in seen if e.topic == "narrator.cue"}
        real = {e.body.cue for e in seen if e.topic == "user.out" and isinstance(e.body, m.Chunk)}
        shadow = {
            e.body.cue for e in seen if e.topic == "shadow.user.out" and isinstance(e.body, m.Chunk)
        }
        assert real == shadow and real <= cues | {""} and real
        by_shadow = [e for e in seen if e.sender == "narrator-shadow"]
        topics = {e.topic for e in by_shadow}
        # no user.out, no decisions the controller would act on, no ack that would stop
        # the controller re-sending a cue the real narrator did not get
        assert topics <= {"shadow.user.out", "heartbeat.narrator-shadow"}, topics
        assert not [e for e in seen if e.topic == "sys.violation"]
    rows = compare(data.logs, LogQuery(conversation="c1"))
    assert rows and all(r.narrator is not None and r.shadow is not None for r in rows)


@pytest.fixture
def tiny_engine(
    tmp_path: Path,
    tiny_tokenizer: PreTrainedTokenizerFast,  # noqa: F811
) -> Iterator[DataDir]:
    """A data directory whose engine socket is served by a tiny random model (no
    ``endpoints.json`` names it: the narrator finds it at ``data.ipc("engine")``)."""
    from engine.server import EngineConfig

    data = DataDir(tmp_path / "data")
    data.ensure()
    ensure_keys(data.keys)
    with serving_tiny(data, tiny_tokenizer, EngineConfig(sink=4, window=252, idle_s=600)):
        yield data


async def test_a_failing_canary_is_rolled_back_and_no_user_turn_is_lost(
    tiny_engine: DataDir,
) -> None:
    """The candidate's engine never answers: its conversations are answered by the
    baseline all the same, and after the minimum sample the candidate is rolled back,
    logged on the bus, kept rolled back across a narrator restart."""
    data = tiny_engine
    dead = f"ipc:///tmp/chorus-no-engine-{uuid.uuid4().hex[:8]}.sock"  # nothing listens
    narrator_args = (
        "--sampling", "max_tokens=16",  # the baseline's: short answers from a random model
        "--candidate-engine", dead,
        "--candidate-sampling", "temperature=0.9",
        "--canary-percent", "50",
        "--canary-min-samples", "2",
        "--canary-timeout-s", "2",
    )  # fmt: skip
    on_candidate = conversations(True, 50, 3)
    on_baseline = conversations(False, 50, 2)
    async with Runtime(data.root, agents={}, engine=False, narrator_args=narrator_args) as rt:
        rollouts = rt.subscribe("event.narrator")
        with anyio.fail_after(60), rt.subscribe("heartbeat.narrator") as beats:
            await anext(beats)
        endings: dict[str, m.Chunk] = {}
        for conversation in [*on_baseline, *on_candidate]:
            with anyio.fail_after(90):
                chunks = [c async for c in rt.chat("hello!", conversation=conversation)]
            endings[conversation] = chunks[-1]
        # every turn was answered, and by the model (the baseline's), not a playbook
        assert all(c.final and c.closes_turn for c in endings.values())
        assert {c.finish for c in endings.values()} == {"done"}, endings
        with anyio.fail_after(30):
            async for env in rollouts:
                if isinstance(env.body, m.Rollout) and env.body.action == "rollback":
                    rollback = env.body
                    break
        assert rollback.percent == 0 and "error rate 100%" in rollback.reason
        assert rollback.candidate_figures.errors == rollback.candidate_figures.samples == 2
        assert rollback.baseline_figures.errors == 0
        saved = json.loads((data.root / "rollout.json").read_text())
        assert saved["phase"] == "rolled_back" and saved["candidate"] == rollback.candidate
        # a restarted narrator does not start the rolled-back candidate again
        assert rt.supervisor is not None
        process = rt.supervisor.children["narrator"].process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        with anyio.fail_after(60):
            async for env in rollouts:
                if isinstance(env.body, m.Rollout):
                    assert env.body.action == "skipped", env.body
                    break
        with anyio.fail_after(60):
            chunks = [c async for c in rt.chat("hello again", conversation=on_candidate[0])]
        assert chunks[-1].finish == "done"
    # every switch is in the bus log (the start came before this test subscribed)
    logged = query_envelopes(data.logs, LogQuery(topics=("event.narrator",)))
    actions = [e.body.action for e in logged if isinstance(e.body, m.Rollout)]
    assert actions == ["start", "rollback", "skipped"], actions


# -- a candidate model ----------------------------------------------------------------------


def test_a_candidate_model_gets_the_engine_flags_and_conflicts_are_named(tmp_path: Path) -> None:
    assert cli.candidate_engine_flags(Settings.load()[0]) is None
    flags = cli.candidate_engine_flags(
        Settings.load(candidate_model="/models/next.gguf", window=500, engine_idle_s=60)[0]
    )
    assert flags is not None
    assert flags[flags.index("--model") + 1] == "/models/next.gguf"
    assert flags[flags.index("--window") + 1] == "500"  # the engine's own settings
    with pytest.raises(ConfigError, match="not both"):
        cli.candidate_engine_flags(
            Settings.load(candidate_model="/m.gguf", candidate_engine="ipc:///x")[0]
        )
    with pytest.raises(ConfigError, match="needs the engine"):
        cli.candidate_engine_flags(Settings.load(candidate_model="/m.gguf", engine=False)[0])


@pytest.mark.slow
async def test_launch_serves_a_candidate_model_from_a_second_engine_that_the_canary_speaks_through(
    tmp_path: Path,
) -> None:
    """The real default model as the candidate's too: launch starts ``engine-candidate``,
    and with the canary at 100% the answer is made there, not on the first engine."""
    import subprocess
    import sys

    from engine.client import Client
    from engine.weights import default_model_path
    from runtime.embed import connect

    data = DataDir(tmp_path / "data")
    argv = [sys.executable, "-m", "runtime", "launch", "--data-dir", str(data.root)]
    argv += ["--candidate-model", str(default_model_path()), "--canary-percent", "100"]
    env = {**os.environ, "CHORUS_RAG_METHOD": "bm25"}  # no MiniLM index to build
    out = tmp_path / "launch.out"
    with out.open("wb") as sink:
        launch = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=env
        )
    try:
        with anyio.fail_after(300):
            while b"Chorus is up" not in out.read_bytes():
                assert launch.poll() is None, out.read_text()[-3000:]
                await anyio.sleep(0.2)
        assert b"engine-candidate" in out.read_bytes()  # its ready line
        async with connect(data.root) as conn:
            with anyio.fail_after(120):
                said = [c async for c in conn.chat("hello!", conversation="c1")]
        assert said[-1].finish == "done" and "".join(c.delta for c in said).strip()
        generated = {}
        for name in ("engine", "engine-candidate"):
            async with Client("operator", data.ipc(name), data.keys, timeout=30) as llm:
                generated[name] = (await llm.stats()).tokens_generated
        # the answer was made by the candidate's engine; the first one made nothing
        assert generated["engine-candidate"] > 0 and generated["engine"] == 0, generated
        logged = list(query_envelopes(data.logs, LogQuery(topics=("event.narrator",))))
        rollouts = [e.body for e in logged if isinstance(e.body, m.Rollout)]
        assert any(r.action == "start" and r.percent == 100 for r in rollouts), rollouts
        assert (data.process_logs / "engine-candidate.log").exists()
    finally:
        launch.send_signal(signal.SIGINT)
        try:
            launch.wait(30)
        except subprocess.TimeoutExpired:
            launch.kill()
            launch.wait()
