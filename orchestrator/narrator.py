"""The narrator: the only voice the user hears.

It reads ``narrator.cue`` and turns each cue into a stream of ``user.out`` chunks (the
broker lets no other identity publish there). One persistent engine session per
conversation: each cue appends only its new material, so the model keeps the shape of
the whole conversation and, with the StreamingLLM cache, never runs out of context.

* ``answer`` cues: the user's text goes into the session and the model answers.
* ``ack`` cues: a templated line at once ("asking the search agent…"), recorded in
  the session as the assistant's turn; no model round trip, so the user hears at once.
* ``progress`` / ``result`` cues: the notes go in, the model tells the user; sources
  are attached by code to the final chunk and to the text, never left to the model.
* ``playbook`` lines are sent as notices without the model, so they work with the
  engine down.

A new user turn (``user.in``) cancels the utterance in progress at once (its stream
ends with an ``interrupted`` chunk, and the engine request with it), before the
controller has even routed the turn: the user barged in. A cue with ``preempt`` does
the same, for the controller's own reasons.

A conversation quiet for ``forget_s`` (the engine's idle eviction time, so its session
is gone there too) is forgotten here: its speaker ends and its state is dropped, so a
narrator that serves conversation after conversation stays the same size. Its next cue
starts it afresh, from the rolling summary.

After a turn closes, the narrator brings the conversation's rolling summary up to date
(``orchestrator/log/summarize.py``); a session reopened after eviction starts from it.
Prompt material is fitted to token budgets counted with the engine's tokenizer.

Rollouts (``docs/rollout.md``): the narrator speaks with a *voice* (system prompt,
sampling, engine; :mod:`orchestrator.canary`). With a candidate voice it runs a canary:
a stable share of conversations hears the candidate, each voice's errors and first-token
latency are counted, and the candidate is rolled back (``Rollout`` on ``event.narrator``)
when it does worse than the baseline; a candidate that fails before its first word is
retried on the baseline, so the user still gets an answer. As ``narrator-shadow`` the
same class is the shadow: it hears the same cues and speaks on ``shadow.user.out``, never
acknowledges a cue (only ``narrator`` does), reports no decisions the controller would act
on, and writes no summaries.
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
import msgspec
import structlog

from engine.client import Client, EngineError, EngineUnavailable, SessionLost
from engine.protocol import Message
from engine.sampling import SamplingParams
from runtime import messages as m
from runtime.bus import Bus
from runtime.paths import DataDir
from runtime.recent import RecentIds

from . import prompts
from .budget import Section, fit
from .canary import Arm, Canary, Phase, Policy, Voice, load_phase, save_phase
from .log import summarize
from .process import heartbeat_loop
from .tokens import EngineCounter, TokenCounter

log = structlog.get_logger("narrator")

DecisionAction = Literal["spoken", "finished"]

# a short paragraph: a small model left to run on repeats itself
SPEAK = SamplingParams(temperature=0.3, top_p=0.9, max_tokens=96, seed=0, stop=["\n\n"])
# progress is one short paragraph: the user wants to know it is moving, not a story
PROGRESS = SamplingParams(temperature=0.3, top_p=0.9, max_tokens=48, seed=0, stop=["\n\n"])
# A summary waits until its conversation has been quiet this long (not one per turn of
# a lively exchange), and runs as background work in the engine, which only advances it
# while no answer is being made.
SUMMARY_QUIET_S = 15.0
ENGINE_DOWN_REPEAT_S = 60.0  # the engine_down playbook at most this often per conversation
SUMMARY_TOKENS = 300  # of the rolling summary in a reopened session's system prompt
NOTES_TOKENS = 400  # of agent notes in one progress or result cue
FORGET_S = 900.0  # a conversation quiet this long is forgotten (as the engine's idle_s)
SEEN_CUES = 10_000  # cue ids remembered: the shadow gets every re-send (it never acks)
# A broker killed mid-answer loses the chunk it held: when the broker is back, the chunks
# of this many seconds are said again (readers keep one of each; runtime.ordering)
RESEND_S = 30.0
RESEND_MAX = 4096
MODEL_CUES = frozenset({"answer", "progress", "result"})  # what a canary measures


@dataclass
class Utterance:
    cue_id: str
    stream: str
    turn: str = ""  # the user turn the cue was about
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


def _turn_of(envelope: m.Envelope) -> str:
    return envelope.body.turn if isinstance(envelope.body, m.Cue) else ""


@dataclass
class _Conversation:
    queue: list[m.Envelope] = field(default_factory=list)
    current: Utterance | None = None
    wake: anyio.Event = field(default_factory=anyio.Event)
    opened: bool = False  # the session of ``arm`` is open on its engine
    arm: Arm = "baseline"  # the voice whose engine session this conversation has
    backlog: list[Message] = field(default_factory=list)  # not yet in the engine session
    engine_down_told: float = -1e9  # when the user last heard the engine_down playbook


@dataclass(frozen=True)
class _Voiced:
    """A voice with its engine client and its sampling, ready to speak."""

    voice: Voice
    engine: Client
    speak: SamplingParams
    progress: SamplingParams
    fingerprint: str

    @classmethod
    def of(cls, voice: Voice, engine: Client) -> _Voiced:
        return cls(
            voice,
            engine,
            voice.params(SPEAK),
            voice.params(PROGRESS, keep_length=True),
            voice.fingerprint(),
        )


class Narrator:
    """Serves until cancelled. ``engine`` is the engine client of ``voice`` (the baseline).

    ``candidate`` (with ``policy``) runs a canary; ``candidate_engine`` is the candidate's
    engine client when it has its own. ``shadow``: serve as ``narrator-shadow``.
    ``forget_s``: a conversation quiet this long is forgotten."""

    def __init__(
        self,
        bus: Bus,
        data: DataDir,
        engine: Client,
        *,
        voice: Voice | None = None,
        candidate: Voice | None = None,
        candidate_engine: Client | None = None,
        policy: Policy | None = None,
        shadow: bool = False,
        forget_s: float = FORGET_S,
    ) -> None:
        self.bus = bus
        self.forget_s = forget_s
        self.data = data
        self.engine = engine
        self.shadow = shadow
        self.topic = "shadow.user.out" if shadow else "user.out"
        self.voices: dict[Arm, _Voiced] = {"baseline": _Voiced.of(voice or Voice(), engine)}
        self.canary: Canary | None = None
        if candidate is not None and not shadow:
            self.voices["candidate"] = _Voiced.of(candidate, candidate_engine or engine)
            fingerprint = self.voices["candidate"].fingerprint
            self.canary = Canary(policy or Policy(), load_phase(self.rollout_file, fingerprint))
        self.conversations: dict[str, _Conversation] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._counter = EngineCounter(engine)
        self._summarizing: set[str] = set()
        self._resummarize: set[str] = set()
        self._seen = RecentIds(SEEN_CUES)
        self._said: collections.deque[tuple[float, str, m.Chunk]] = collections.deque(
            maxlen=RESEND_MAX
        )

    @property
    def rollout_file(self) -> Path:
        """Where a canary's rollback or promotion is kept across restarts."""
        return self.data.root / "rollout.json"

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(heartbeat_loop, self.bus, self.bus.identity, self._state)
            tg.start_soon(self._resend_after_broker_restarts)
            if not self.shadow:  # the shadow may not read user.in; preempt cues still stop it
                tg.start_soon(self._barge_ins)
            if self.canary is not None:
                tg.start_soon(self._operator)
                await self._announce_canary()
            with self.bus.subscribe("narrator.cue") as cues:
                async for envelope in cues:
                    if isinstance(envelope.body, m.Cue) and self._first_copy(envelope.id):
                        self._on_cue(envelope)

    async def _resend_after_broker_restarts(self) -> None:
        """Say the chunks of the last :data:`RESEND_S` again once a restarted broker is
        ready: the one it held when it died is lost otherwise."""
        with self.bus.subscribe("sys.started") as started:
            async for envelope in started:
                body = envelope.body
                if not (isinstance(body, m.ProcessEvent) and body.process == "broker"):
                    continue
                since = time.monotonic() - RESEND_S
                again = [(c, chunk) for at, c, chunk in self._said if at >= since]
                log.info("chunks_said_again", chunks=len(again), reason="the broker restarted")
                for conversation, chunk in again:
                    copy = msgspec.structs.replace(chunk, again=True)
                    await self.bus.publish(self.topic, copy, conversation=conversation)

    def _first_copy(self, cue_id: str) -> bool:
        """Whether this cue is new here (the bus de-duplicates only for ``narrator``)."""
        return self._seen.add(cue_id)

    async def _barge_ins(self) -> None:
        with self.bus.subscribe("user.in") as turns:
            async for envelope in turns:
                c = self.conversations.get(envelope.conversation or "default")
                if c is not None and envelope.sender == "client":
                    self._stop(c, spare=envelope.id)

    def _stop(self, c: _Conversation, spare: str = "") -> None:
        """Drop what is queued and cut what is being said, except what answers the
        user turn ``spare`` (its cue may arrive before the turn itself is seen here)."""
        c.queue = [e for e in c.queue if spare and _turn_of(e) == spare]
        if c.current is not None and not (spare and c.current.turn == spare):
            c.current.scope.cancel()

    def _state(self) -> tuple[str, str | None, int]:
        speaking = [c for c in self.conversations.values() if c.current]
        queued = sum(len(c.queue) for c in self.conversations.values())
        return ("busy" if speaking else "idle", None, queued)

    def _on_cue(self, envelope: m.Envelope) -> None:
        conversation = envelope.conversation or "default"
        assert isinstance(envelope.body, m.Cue)
        c = self.conversations.get(conversation)
        if c is None:
            c = self.conversations[conversation] = _Conversation()
            assert self._tg is not None
            self._tg.start_soon(self._speaker, conversation, c)
        if envelope.body.preempt:
            self._stop(c)
        c.queue.append(envelope)
        c.wake.set()

    async def _speaker(self, conversation: str, c: _Conversation) -> None:
        """One utterance at a time per conversation, in cue order, until the conversation
        has been quiet for ``forget_s``: then it is forgotten."""
        try:
            while True:
                while not c.queue:
                    c.wake = anyio.Event()
                    with anyio.move_on_after(self.forget_s):
                        await c.wake.wait()
                    if not c.queue:
                        return
                envelope = c.queue.pop(0)
                await self._speak(conversation, c, envelope)
        finally:
            if self.conversations.get(conversation) is c:
                del self.conversations[conversation]

    async def _speak(self, conversation: str, c: _Conversation, envelope: m.Envelope) -> None:
        cue = envelope.body
        assert isinstance(cue, m.Cue)
        utterance = Utterance(envelope.id, m.new_id(), cue.turn)
        c.current = utterance
        seq = 0
        finish: m.Finish = "done"

        async def say(
            delta: str,
            *,
            final: bool = False,
            notice: bool = False,
            sources: list[str] | None = None,
            end: m.Finish = "",
            closes_turn: bool = False,
        ) -> None:
            nonlocal seq
            chunk = m.Chunk(
                stream=utterance.stream,
                seq=seq,
                delta=delta,
                final=final,
                finish=end,
                notice=notice,
                sources=sources or [],
                closes_turn=closes_turn,
                turn=cue.turn,
                cue=envelope.id,
            )
            seq += 1
            await self.bus.publish(self.topic, chunk, conversation=conversation)
            self._said.append((time.monotonic(), conversation, chunk))

        await self._decide(conversation, "spoken", cue.kind, envelope.id, cue.tasks)
        try:
            with utterance.scope:
                if cue.playbook:
                    reason = cue.cover[-1].split(": ", 2)[-1] if cue.cover else ""
                    await say(prompts.playbook(cue.playbook, reason) + "\n", notice=True)
                if cue.kind != "playbook":
                    try:
                        await self._utter(conversation, c, cue, say)
                    except (EngineUnavailable, EngineError) as exc:
                        finish = "error"
                        log.warning("engine_failed", conversation=conversation, error=str(exc))
                        busy = isinstance(exc, EngineError) and exc.kind == "busy"
                        for line, notice in self._without_engine(c, cue, busy):
                            await say(line, notice=notice)
                    for attachment in cue.attachments:  # by code: exact, whatever the model said
                        await say(f"\n{attachment}\n")
                    if cue.sources:
                        await say("\nSources: " + ", ".join(cue.sources))
        finally:
            with anyio.CancelScope(shield=True):
                if utterance.scope.cancelled_caught:
                    finish = "interrupted"
                closes = cue.closes_turn or finish == "interrupted"
                await say("", final=True, sources=cue.sources, end=finish, closes_turn=closes)
                await self._decide(conversation, "finished", finish, envelope.id, cue.tasks)
                c.current = None
                if closes:
                    self._schedule_summary(conversation)

    def _without_engine(
        self, c: _Conversation, cue: m.Cue, busy: bool = False
    ) -> list[tuple[str, bool]]:
        """What is said when the model cannot speak: the engine_down playbook, or
        engine_busy when it refused for want of a free session (with every answer and
        result; with progress once a minute per conversation, not at every watchdog
        tick), then, for a result, the agents' notes as they are, so the user gets the
        result anyway."""
        lines: list[tuple[str, bool]] = []
        now = time.monotonic()
        if cue.kind != "progress" or now - c.engine_down_told > ENGINE_DOWN_REPEAT_S:
            c.engine_down_told = now
            playbook = "engine_busy" if busy else "engine_down"
            lines.append((prompts.playbook(playbook) + "\n", True))
        if cue.kind == "result" and cue.cover:
            notes = "; ".join(note.split(": ", 2)[-1] for note in cue.cover)
            lines.append((f"Here is what came back: {notes}\n", False))
        elif cue.kind == "progress" and not lines:
            lines.append(("Still working on it.\n", False))
        return lines

    async def _decide(
        self, conversation: str, action: DecisionAction, reason: str, cue_id: str, tasks: list[str]
    ) -> None:
        if self.shadow:  # the controller gates on the real narrator's decisions alone
            return
        body = m.Decision(action=action, reason=reason, cue=cue_id, tasks=tasks)
        await self.bus.publish("narrator.decision", body, conversation=conversation)

    # -- voices and the canary ---------------------------------------------------------------

    async def _utter(
        self,
        conversation: str,
        c: _Conversation,
        cue: m.Cue,
        say: Callable[[str], Awaitable[None]],
    ) -> None:
        """Say the words of one cue in the conversation's voice, counting the outcome for
        the canary. A candidate that fails before its first word is counted as an error
        and the baseline speaks instead; other failures reach the caller."""
        first_arm = self.canary.arm_for(conversation) if self.canary is not None else "baseline"
        arms: list[Arm] = [first_arm] if first_arm == "baseline" else ["candidate", "baseline"]
        for arm in arms:
            if c.arm != arm:  # a new voice: its own session, opened from the summary
                c.arm, c.opened = arm, False
            started = time.monotonic()
            first: float | None = None
            try:
                async for delta in self._words(conversation, c, cue):
                    if first is None:
                        first = time.monotonic() - started
                    await say(delta)
            except (EngineUnavailable, EngineError) as exc:
                await self._outcome(arm, cue, error=True)
                if first is not None or arm == arms[-1]:
                    raise
                log.warning("candidate_failed", conversation=conversation, error=str(exc))
                continue
            await self._outcome(arm, cue, error=False, first_token_s=first)
            return

    async def _outcome(
        self, arm: Arm, cue: m.Cue, *, error: bool, first_token_s: float | None = None
    ) -> None:
        if self.canary is None or cue.kind not in MODEL_CUES:
            return
        why = self.canary.record(arm, error=error, first_token_s=first_token_s)
        if why is not None:
            self.canary.roll_back()
            self._save_phase("rolled_back", why)
            await self._switch("rollback", why)
        elif self.canary.report_due():
            await self._switch("report", "")

    async def _announce_canary(self) -> None:
        assert self.canary is not None
        match self.canary.phase:
            case "rolled_back":
                await self._switch(
                    "skipped",
                    f"rolled back before ({self.rollout_file}); "
                    "`python -m runtime config canary=resume` runs it again",
                )
            case "promoted":
                await self._switch("promote", f"promoted before ({self.rollout_file})")
            case "running" if self.canary.share > 0:
                await self._switch("start", f"{self.canary.share:g}% of conversations")

    async def _operator(self) -> None:
        """Run-time control: ``canary_percent=N``, ``canary=rollback|promote|resume``."""
        with self.bus.subscribe("sys.config") as changes:
            async for envelope in changes:
                if isinstance(envelope.body, m.ConfigChange):
                    await self._configure(envelope.body.key, envelope.body.value.strip())

    async def _configure(self, key: str, value: str) -> None:
        canary = self.canary
        assert canary is not None
        before = canary.share
        if key == "canary_percent":
            try:
                canary.set_percent(float(value))
            except ValueError as exc:
                log.warning("config_rejected", key=key, value=value, error=str(exc))
                return
            if canary.phase == "running" and canary.share != before:
                action: m.RolloutAction = "start" if before == 0 else "change"
                await self._switch(action, f"the operator set {canary.share:g}%")
        elif key == "canary":
            phase: Phase
            match value:
                case "rollback" if canary.phase != "rolled_back":
                    canary.roll_back()
                    phase, action = "rolled_back", "rollback"
                case "promote" if canary.phase != "promoted":
                    canary.promote()
                    phase, action = "promoted", "promote"
                case "resume" if canary.phase != "running":
                    canary.resume()
                    phase, action = "running", "start"
                case _:
                    log.warning("config_ignored", key=key, value=value, phase=canary.phase)
                    return
            self._save_phase(phase, "the operator")
            await self._switch(action, f"the operator asked to {value}")

    def _save_phase(self, phase: Phase, reason: str) -> None:
        try:
            save_phase(self.rollout_file, self.voices["candidate"].fingerprint, phase, reason)
        except OSError as exc:  # the switch holds in memory; a restart may undo it
            log.error("rollout_state_not_written", error=str(exc))

    async def _switch(self, action: m.RolloutAction, reason: str) -> None:
        """Log a canary switch on ``event.narrator`` (and in the process log)."""
        assert self.canary is not None
        body = m.Rollout(
            action=action,
            candidate=self.voices["candidate"].fingerprint,
            baseline=self.voices["baseline"].fingerprint,
            percent=self.canary.share,
            reason=reason,
            candidate_figures=self.canary.records["candidate"].figures(),
            baseline_figures=self.canary.records["baseline"].figures(),
        )
        log.info(f"canary_{action}", percent=body.percent, reason=reason)
        await self.bus.publish(f"event.{self.bus.identity}", body)

    # -- words -------------------------------------------------------------------------------

    def _session(self, conversation: str, arm: Arm) -> str:
        """The engine session of a conversation in a voice (the candidate's may share the
        baseline's engine)."""
        return conversation if arm == "baseline" else f"{conversation}~{arm}"

    async def _words(self, conversation: str, c: _Conversation, cue: m.Cue) -> AsyncIterator[str]:
        """The text of one utterance, in the voice of ``c.arm``; appends only the cue's new
        material to the session."""
        if cue.kind == "ack":
            line = f"On it — I've {', '.join(cue.cover) or 'started working on that'}."
            yield line  # templated, so the user hears at once, engine or not
            turn = [
                Message(role="user", content=cue.user_text),
                Message(role="assistant", content=line),
            ]
            try:
                await self._append(conversation, c, turn)
            except (EngineUnavailable, EngineError) as exc:
                c.backlog += turn  # the session catches up on its next append
                log.warning("ack_not_recorded", conversation=conversation, error=str(exc))
            return
        if cue.kind == "answer":
            material = cue.user_text
        else:
            count = await self._count()
            notes = "; ".join(cue.cover) or "still working"
            budget = NOTES_TOKENS - count(prompts.template("narrator_cue"))
            notes = fit([Section("cover", notes, min_tokens=20, keep_end=False)], budget, count)[
                "cover"
            ]
            material = prompts.render(
                "narrator_cue", user_text="", kind=cue.kind, cover=notes
            ).strip()
        await self._append(
            conversation, c, [Message(role="user", content=material)], generation_prompt=True
        )
        voiced = self.voices[c.arm]
        params = voiced.progress if cue.kind == "progress" else voiced.speak
        async for chunk in voiced.engine.generate(self._session(conversation, c.arm), params):
            if chunk.delta:
                yield chunk.delta

    async def _append(
        self,
        conversation: str,
        c: _Conversation,
        messages: list[Message],
        generation_prompt: bool = False,
    ) -> None:
        voiced, session = self.voices[c.arm], self._session(conversation, c.arm)
        for attempt in (1, 2):
            try:
                if not c.opened:
                    system = await self._system_prompt(conversation, voiced.voice)
                    await voiced.engine.open(session, system_prompt=system)
                    c.opened = True
                await voiced.engine.append(
                    session,
                    messages=[*c.backlog, *messages],
                    generation_prompt=generation_prompt,
                )
                c.backlog = []
                return
            except SessionLost:
                # evicted while idle: reopen with the rolling summary in the system prompt
                c.opened = False
                if attempt == 2:
                    raise

    async def _system_prompt(self, conversation: str, voice: Voice) -> str:
        summary = summarize.summary_text(self.data, conversation)
        if summary:
            count = await self._count()
            summary = fit([Section("summary", summary, min_tokens=30)], SUMMARY_TOKENS, count)[
                "summary"
            ]
            summary = "What happened earlier in this conversation: " + summary
        return voice.system_prompt(summary)

    async def _count(self) -> TokenCounter:
        return await self._counter.get()

    # -- summaries ---------------------------------------------------------------------------

    def _schedule_summary(self, conversation: str) -> None:
        if self.shadow:  # the real narrator keeps the summaries; the shadow only reads them
            return
        if conversation in self._summarizing:
            self._resummarize.add(conversation)  # the running update goes round once more
            return
        assert self._tg is not None
        self._summarizing.add(conversation)
        self._tg.start_soon(self._summarize, conversation)

    async def _summarize(self, conversation: str) -> None:
        try:
            while True:
                self._resummarize.discard(conversation)
                await anyio.sleep(SUMMARY_QUIET_S)
                c = self.conversations.get(conversation)  # None: forgotten since
                if conversation in self._resummarize or (c and (c.current or c.queue)):
                    continue  # still talking
                try:
                    done = await summarize.update(
                        self.data, conversation, self.engine, await self._count()
                    )
                except OSError as exc:  # the summary is derived data: the log keeps everything
                    log.warning("summary_not_written", conversation=conversation, error=str(exc))
                else:
                    if done is not None:
                        log.info("summary_updated", conversation=conversation, method=done.method)
                if conversation not in self._resummarize:
                    return
        finally:
            self._summarizing.discard(conversation)
