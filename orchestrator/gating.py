"""``speak_now`` gating and the idle watchdog: when the narrator may speak, and about what.

A pure state machine on an injectable clock, so its tests drive time instead of
sleeping. The controller feeds it events and publishes what it returns:

* one utterance at a time: while the narrator speaks, events wait (``held``);
* a minimum gap between progress updates (``min_gap_s``, default 4 s);
* events arriving close together become one cue (``coalesced``);
* results outrank progress: a cue with results carries no progress;
* a new user turn preempts: the current utterance is cancelled and the turn answered;
* nothing is said about a task whose result the user already heard (``dropped``);
* while tasks run and the user heard nothing for ``idle_s`` (default 8 s), one short
  progress cue per idle period.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from runtime import messages as m


class Clock(Protocol):
    def __call__(self) -> float: ...


class ManualClock:
    """A clock for tests: time moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class GateConfig:
    min_gap_s: float = 4.0  # between two progress updates
    idle_s: float = 8.0  # silence while tasks run before a progress cue
    coalesce_s: float = 0.3  # events this close together share one cue
    forget_s: float = 900.0  # a conversation with nothing going on this long is forgotten


EventKind = Literal["progress", "result", "failed"]


@dataclass
class TaskEvent:
    task: str
    kind: EventKind
    text: str
    at: float
    sources: list[str] = field(default_factory=list)
    playbook: str = ""  # a playbook to tell the user with this event (agent crashed, …)
    attachments: list[str] = field(default_factory=list)  # shown verbatim, e.g. program output


@dataclass
class Out:
    """What the gate wants published: a cue for the narrator, or a decision record."""

    conversation: str
    body: m.Cue | m.Decision


@dataclass
class _Conversation:
    speaking: str | None = None  # the cue id being spoken
    speaking_kind: str = ""
    pending: list[TaskEvent] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    heard_results: set[str] = field(default_factory=set)
    last_heard: float = 0.0  # when the last utterance ended (or the turn came in)
    last_progress: float = -1e9
    idle_fired: bool = False
    held: set[str] = field(default_factory=set)  # tasks whose hold was already recorded
    turn: str = ""  # the latest user turn
    notices: list[tuple[str, str]] = field(default_factory=list)  # (playbook, reason) to say


PRIORITY = {"answer": 3, "ack": 1, "progress": 1, "result": 2, "playbook": 2}


class Gate:
    """Decides when the narrator may speak, per conversation."""

    def __init__(self, clock: Clock = time.monotonic, config: GateConfig | None = None) -> None:
        self.clock = clock
        self.config = config or GateConfig()
        self._convs: dict[str, _Conversation] = {}
        self._turn_of: dict[str, str] = {}  # task -> the user turn it serves

    def _conv(self, conversation: str) -> _Conversation:
        if conversation not in self._convs:
            self._convs[conversation] = _Conversation(last_heard=self.clock())
        return self._convs[conversation]

    def speaking(self, conversation: str) -> bool:
        return self._conv(conversation).speaking is not None

    # -- inputs ----------------------------------------------------------------------------

    def user_turn(
        self,
        conversation: str,
        text: str,
        *,
        tasks: list[str],
        kind: m.CueKind = "answer",
        turn: str = "",
    ) -> list[Out]:
        """A new user turn: preempt whatever is being said, and answer (or acknowledge
        the work started for it, when ``tasks`` were assigned)."""
        c = self._conv(conversation)
        out: list[Out] = []
        preempt = c.speaking is not None
        if preempt:
            out.append(
                Out(
                    conversation,
                    m.Decision(action="preempted", reason="a new user turn", cue=c.speaking or ""),
                )
            )
        c.pending = [e for e in c.pending if e.kind != "progress"]  # old progress is moot now
        c.running |= set(tasks)
        c.turn = turn
        self._turn_of.update(dict.fromkeys(tasks, turn))
        c.idle_fired = False
        c.last_heard = self.clock()
        cue = m.Cue(
            speak_now=True,
            priority=PRIORITY[kind],
            reason="user turn" if not tasks else "work started for the user turn",
            kind=kind,
            user_text=text,
            tasks=tasks,
            preempt=preempt,
            closes_turn=not tasks,
            turn=turn,
        )
        out.append(Out(conversation, cue))
        return out

    def task_event(self, conversation: str, event: TaskEvent) -> list[Out]:
        """An agent reported progress, a result or a failure."""
        c = self._conv(conversation)
        if event.task in c.heard_results:
            why = f"the user already heard the result of {event.task}"
            return [Out(conversation, m.Decision(action="dropped", reason=why, tasks=[event.task]))]
        if event.kind in ("result", "failed"):
            c.running.discard(event.task)
            c.pending = [e for e in c.pending if e.task != event.task]  # its progress is moot
        c.pending.append(event)
        return self.tick()

    def notice(self, conversation: str, playbook: str, reason: str) -> list[Out]:
        """A playbook line about the system, not a task (storage failing, input
        rejected): said as soon as nothing else is being said."""
        self._conv(conversation).notices.append((playbook, reason))
        return self.tick()

    def turn_lost(self, conversation: str, turn: str, playbook: str) -> list[Out]:
        """A user turn that cannot be answered (its words are gone): the playbook's line
        closes it at once."""
        cue = m.Cue(
            speak_now=True,
            priority=PRIORITY["playbook"],
            reason=f"playbook {playbook}",
            kind="playbook",
            playbook=playbook,
            closes_turn=True,
            turn=turn,
        )
        return [Out(conversation, cue)]

    def task_started(self, conversation: str, task: str, turn: str = "") -> None:
        """A task runs for ``conversation`` (serving the user turn ``turn``, when the
        turn was not seen here: a task taken over from a controller that restarted)."""
        c = self._conv(conversation)
        c.running.add(task)
        if turn:
            self._turn_of[task] = turn
            c.turn = c.turn or turn

    def utterance_started(self, conversation: str, cue_id: str, kind: str) -> None:
        c = self._conv(conversation)
        c.speaking, c.speaking_kind = cue_id, kind

    def utterance_finished(self, conversation: str, cue_id: str) -> list[Out]:
        c = self._conv(conversation)
        if c.speaking == cue_id:
            c.speaking = None
            c.last_heard = self.clock()
            c.idle_fired = False
        return self.tick()

    # -- the clock -------------------------------------------------------------------------

    def tick(self) -> list[Out]:
        """Flush what may be said now and run the idle watchdog; call it often.
        Conversations with nothing going on for ``forget_s`` are forgotten here."""
        out: list[Out] = []
        quiet = []
        for conversation, c in self._convs.items():
            out += self._flush(conversation, c)
            if self._quiet(c):
                quiet.append(conversation)
        for conversation in quiet:
            del self._convs[conversation]
        return out

    def _quiet(self, c: _Conversation) -> bool:
        busy = c.speaking or c.pending or c.running or c.notices
        return not busy and self.clock() - c.last_heard > self.config.forget_s

    def _flush(self, conversation: str, c: _Conversation) -> list[Out]:
        now = self.clock()
        if c.speaking is not None:
            fresh = [e for e in c.pending if e.task not in c.held]
            if fresh:
                c.held |= {e.task for e in fresh}
                why = "the narrator is speaking; one utterance at a time"
                return [
                    Out(
                        conversation,
                        m.Decision(action="held", reason=why, tasks=[e.task for e in fresh]),
                    )
                ]
            return []
        if c.notices:
            playbook, reason = c.notices.pop(0)
            cue = m.Cue(
                speak_now=True,
                priority=PRIORITY["playbook"],
                reason=f"playbook {playbook}",
                kind="playbook",
                cover=[f"{playbook}: notice: {reason}"],
                playbook=playbook,
                turn=c.turn,
            )
            return [Out(conversation, cue)]
        if c.pending and now - min(e.at for e in c.pending) >= self.config.coalesce_s:
            results = [e for e in c.pending if e.kind != "progress"]
            if results:
                return self._speak(conversation, c, results, "result")
            if now - c.last_progress >= self.config.min_gap_s:
                return self._speak(conversation, c, list(c.pending), "progress")
            return []
        if (
            c.running
            and not c.pending
            and not c.idle_fired
            and now - c.last_heard >= self.config.idle_s
        ):
            c.idle_fired = True
            c.last_progress = now
            cue = m.Cue(
                speak_now=True,
                priority=PRIORITY["progress"],
                reason=f"idle watchdog: {now - c.last_heard:.0f} s without a word while tasks run",
                kind="progress",
                cover=["still working"],
                tasks=sorted(c.running),
                turn=c.turn,
            )
            return [Out(conversation, cue)]
        return []

    def _speak(
        self, conversation: str, c: _Conversation, events: list[TaskEvent], kind: m.CueKind
    ) -> list[Out]:
        out: list[Out] = []
        tasks = [e.task for e in events]
        if len(events) > 1:
            out.append(
                Out(
                    conversation,
                    m.Decision(
                        action="coalesced", reason=f"{len(events)} events in one cue", tasks=tasks
                    ),
                )
            )
        if kind == "result":
            dropped = [e.task for e in c.pending if e.kind == "progress"]
            if dropped:
                why = "results outrank progress"
                out.append(
                    Out(conversation, m.Decision(action="dropped", reason=why, tasks=dropped))
                )
            c.heard_results |= set(tasks)
        else:
            c.last_progress = self.clock()
        c.pending = []
        c.held -= set(tasks)
        failed = any(e.kind == "failed" for e in events)
        cue = m.Cue(
            speak_now=True,
            priority=PRIORITY[kind],
            reason=f"{len(events)} {kind} event(s)" + (" incl. a failure" if failed else ""),
            kind=kind,
            cover=[f"{e.task}: {e.kind}: {e.text}" for e in events],
            sources=[s for e in events for s in e.sources],
            tasks=tasks,
            playbook=next(
                (e.playbook for e in events if e.playbook), "task_failed" if failed else ""
            ),
            closes_turn=kind == "result" and not c.running,
            attachments=[a for e in events for a in e.attachments],
            turn=self._turn_of.get(events[0].task, c.turn),
        )
        if kind == "result":  # these tasks are done: a late duplicate is dropped unheard
            for task in tasks:
                self._turn_of.pop(task, None)
        out.append(Out(conversation, cue))
        return out

    def configure(self, key: str, value: float) -> bool:
        """A run-time change of a timer (``sys.config``); False for an unknown key."""
        if key in ("min_gap_s", "idle_s", "coalesce_s"):
            setattr(self.config, key, value)
            return True
        return False
