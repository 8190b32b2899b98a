"""Each speak_now rule and the idle watchdog, on a clock the test drives."""

from __future__ import annotations

from orchestrator.gating import Gate, GateConfig, ManualClock, Out, TaskEvent
from runtime import messages as m

C = "conv"


def cues(outs: list[Out]) -> list[m.Cue]:
    return [o.body for o in outs if isinstance(o.body, m.Cue)]


def decisions(outs: list[Out], action: str) -> list[m.Decision]:
    return [o.body for o in outs if isinstance(o.body, m.Decision) and o.body.action == action]


def setup() -> tuple[Gate, ManualClock]:
    clock = ManualClock()
    return Gate(clock, GateConfig(min_gap_s=4, idle_s=8, coalesce_s=0.3)), clock


def event(
    clock: ManualClock, task: str, kind: str = "progress", text: str = "working"
) -> TaskEvent:
    return TaskEvent(task=task, kind=kind, text=text, at=clock())  # type: ignore[arg-type]


def test_one_utterance_at_a_time() -> None:
    gate, clock = setup()
    gate.user_turn(C, "find x", tasks=["t1"], kind="ack")
    gate.utterance_started(C, "cue-1", "ack")
    outs = gate.task_event(C, event(clock, "t1", "result", "found x"))
    clock.advance(1)
    outs += gate.tick()
    assert cues(outs) == [], "spoke over the current utterance"
    assert decisions(outs, "held")
    clock.advance(1)
    assert len(decisions(gate.tick(), "held")) == 0, "a hold is recorded once"
    [result] = cues(gate.utterance_finished(C, "cue-1"))
    assert result.kind == "result" and result.tasks == ["t1"]


def test_minimum_gap_between_progress_updates() -> None:
    gate, clock = setup()
    gate.user_turn(C, "q", tasks=["t1"], kind="ack")
    gate.task_event(C, event(clock, "t1"))
    clock.advance(0.5)
    [first] = cues(gate.tick())
    assert first.kind == "progress"
    gate.utterance_started(C, "p1", "progress")
    gate.utterance_finished(C, "p1")
    gate.task_event(C, event(clock, "t1", text="half way"))
    clock.advance(1)
    assert cues(gate.tick()) == [], "progress again within 4 s"
    clock.advance(3)
    [second] = cues(gate.tick())
    assert second.kind == "progress" and "half way" in second.cover[0]


def test_events_close_together_are_coalesced() -> None:
    gate, clock = setup()
    gate.user_turn(C, "q", tasks=["a", "b"], kind="ack")
    gate.task_event(C, event(clock, "a", "result", "A done"))
    clock.advance(0.1)
    assert cues(gate.task_event(C, event(clock, "b", "result", "B done"))) == []
    clock.advance(0.3)
    outs = gate.tick()
    [cue] = cues(outs)
    assert sorted(cue.tasks) == ["a", "b"]
    assert decisions(outs, "coalesced")


def test_results_outrank_progress() -> None:
    gate, clock = setup()
    gate.user_turn(C, "q", tasks=["a", "b"], kind="ack")
    gate.task_event(C, event(clock, "a", "progress", "still on a"))
    gate.task_event(C, event(clock, "b", "result", "B done"))
    clock.advance(0.5)
    outs = gate.tick()
    [cue] = cues(outs)
    assert cue.kind == "result" and cue.tasks == ["b"]
    assert decisions(outs, "dropped")[0].tasks == ["a"]


def test_new_user_turn_preempts() -> None:
    gate, _ = setup()
    gate.user_turn(C, "first", tasks=[])
    gate.utterance_started(C, "cue-1", "answer")
    outs = gate.user_turn(C, "second", tasks=[])
    [cue] = cues(outs)
    assert cue.preempt and cue.user_text == "second"
    assert decisions(outs, "preempted")[0].cue == "cue-1"


def test_nothing_more_about_a_task_already_heard() -> None:
    gate, clock = setup()
    gate.user_turn(C, "q", tasks=["t1"], kind="ack")
    gate.task_event(C, event(clock, "t1", "result", "done"))
    clock.advance(0.5)
    assert cues(gate.tick())
    outs = gate.task_event(C, event(clock, "t1", "progress", "late progress"))
    clock.advance(5)
    outs += gate.tick()
    assert cues(outs) == []
    assert decisions(outs, "dropped")


def test_idle_watchdog_fires_once_per_idle_period() -> None:
    gate, clock = setup()
    gate.user_turn(C, "q", tasks=["t1"], kind="ack")
    clock.advance(7)
    assert cues(gate.tick()) == []
    clock.advance(1.5)
    [cue] = cues(gate.tick())
    assert cue.kind == "progress" and "idle" in cue.reason
    clock.advance(20)
    assert cues(gate.tick()) == [], "fired twice in one idle period"
    gate.utterance_started(C, "idle-1", "progress")
    gate.utterance_finished(C, "idle-1")
    clock.advance(8.5)
    assert len(cues(gate.tick())) == 1, "a new idle period fires again"


def test_no_idle_cue_without_running_tasks() -> None:
    gate, clock = setup()
    gate.user_turn(C, "hi", tasks=[])
    clock.advance(60)
    assert cues(gate.tick()) == []


def test_timers_change_at_run_time() -> None:
    gate, clock = setup()
    assert gate.configure("idle_s", 2)
    assert not gate.configure("nonsense", 1)
    gate.user_turn(C, "q", tasks=["t1"], kind="ack")
    clock.advance(2.5)
    assert cues(gate.tick())


def test_failure_cue_names_the_playbook() -> None:
    gate, clock = setup()
    gate.user_turn(C, "q", tasks=["t1"], kind="ack")
    gate.task_event(C, event(clock, "t1", "failed", "timed out twice"))
    clock.advance(0.5)
    [cue] = cues(gate.tick())
    assert cue.playbook == "task_failed"


def test_a_system_notice_waits_for_the_current_utterance_then_is_said_once() -> None:
    gate, clock = setup()
    gate.user_turn(C, "hello", tasks=[], turn="turn-1")
    gate.utterance_started(C, "cue-1", "answer")
    assert cues(gate.notice(C, "storage_failed", "disk full")) == []  # not over the answer
    said = cues(gate.utterance_finished(C, "cue-1"))
    assert len(said) == 1 and said[0].kind == "playbook"
    assert said[0].playbook == "storage_failed" and said[0].turn == "turn-1"
    assert (
        said[0].cover[-1].split(": ", 2)[-1] == "disk full"
    )  # the reason, as the narrator reads it
    assert not said[0].closes_turn
    clock.advance(1)
    assert cues(gate.tick()) == []


def test_quiet_conversations_are_forgotten_busy_ones_kept() -> None:
    gate, clock = setup()
    gate.config.forget_s = 100
    for conversation in ("done", "running"):
        gate.user_turn(conversation, "q", tasks=[f"{conversation}-t"], kind="ack")
        gate.utterance_started(conversation, f"{conversation}-ack", "ack")
        gate.utterance_finished(conversation, f"{conversation}-ack")
    gate.task_event("done", event(clock, "done-t", "result", "found"))
    clock.advance(1)
    [result] = cues(gate.tick())
    assert result.turn == ""  # (no turn id was given) and its task's turn is let go
    gate.utterance_started("done", "done-result", "result")
    gate.utterance_finished("done", "done-result")
    clock.advance(99)
    gate.tick()
    assert set(gate._convs) == {"done", "running"}  # not yet past forget_s
    clock.advance(2)
    gate.tick()
    # nothing going on in "done" for forget_s: forgotten; "running" has a task
    assert set(gate._convs) == {"running"}
    assert "done-t" not in gate._turn_of and "running-t" in gate._turn_of
