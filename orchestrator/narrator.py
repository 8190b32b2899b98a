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

After a turn closes, the narrator brings the conversation's rolling summary up to date
(``orchestrator/log/summarize.py``); a session reopened after eviction starts from it.
Prompt material is fitted to token budgets counted with the engine's tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import anyio
import structlog

from engine.client import Client, EngineError, EngineUnavailable, SessionLost
from engine.protocol import Message
from engine.sampling import SamplingParams
from runtime import messages as m
from runtime.bus import Bus
from runtime.paths import DataDir

from . import prompts
from .budget import Section, fit
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
    opened: bool = False
    backlog: list[Message] = field(default_factory=list)  # not yet in the engine session
    engine_down_told: float = -1e9  # when the user last heard the engine_down playbook


class Narrator:
    """Serves until cancelled. ``engine`` is the narrator's engine client."""

    def __init__(
        self, bus: Bus, data: DataDir, engine: Client, *, params: SamplingParams = SPEAK
    ) -> None:
        self.bus = bus
        self.data = data
        self.engine = engine
        self.params = params
        self.conversations: dict[str, _Conversation] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._counter = EngineCounter(engine)
        self._summarizing: set[str] = set()
        self._resummarize: set[str] = set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(heartbeat_loop, self.bus, "narrator", self._state)
            tg.start_soon(self._barge_ins)
            with self.bus.subscribe("narrator.cue") as cues:
                async for envelope in cues:
                    if isinstance(envelope.body, m.Cue):
                        self._on_cue(envelope)

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
        """One utterance at a time per conversation, in cue order."""
        while True:
            while not c.queue:
                c.wake = anyio.Event()
                await c.wake.wait()
            envelope = c.queue.pop(0)
            await self._speak(conversation, c, envelope)

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
            )
            seq += 1
            await self.bus.publish("user.out", chunk, conversation=conversation)

        await self._decide(conversation, "spoken", cue.kind, envelope.id, cue.tasks)
        try:
            with utterance.scope:
                if cue.playbook:
                    reason = cue.cover[-1].split(": ", 2)[-1] if cue.cover else ""
                    await say(prompts.playbook(cue.playbook, reason) + "\n", notice=True)
                if cue.kind != "playbook":
                    try:
                        async for delta in self._words(conversation, c, cue):
                            await say(delta)
                    except (EngineUnavailable, EngineError) as exc:
                        finish = "error"
                        log.warning("engine_failed", conversation=conversation, error=str(exc))
                        for line, notice in self._without_engine(c, cue):
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

    def _without_engine(self, c: _Conversation, cue: m.Cue) -> list[tuple[str, bool]]:
        """What is said when the model cannot speak: the engine_down playbook (with every
        answer and result; with progress once a minute per conversation, not at every
        watchdog tick), then, for a result, the agents' notes as they are, so the user
        gets the result anyway."""
        lines: list[tuple[str, bool]] = []
        now = time.monotonic()
        if cue.kind != "progress" or now - c.engine_down_told > ENGINE_DOWN_REPEAT_S:
            c.engine_down_told = now
            lines.append((prompts.playbook("engine_down") + "\n", True))
        if cue.kind == "result" and cue.cover:
            notes = "; ".join(note.split(": ", 2)[-1] for note in cue.cover)
            lines.append((f"Here is what came back: {notes}\n", False))
        elif cue.kind == "progress" and not lines:
            lines.append(("Still working on it.\n", False))
        return lines

    async def _decide(
        self, conversation: str, action: DecisionAction, reason: str, cue_id: str, tasks: list[str]
    ) -> None:
        body = m.Decision(action=action, reason=reason, cue=cue_id, tasks=tasks)
        await self.bus.publish("narrator.decision", body, conversation=conversation)

    # -- words -------------------------------------------------------------------------------

    async def _words(self, conversation: str, c: _Conversation, cue: m.Cue) -> AsyncIterator[str]:
        """The text of one utterance; appends only the cue's new material to the session."""
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
        params = PROGRESS if cue.kind == "progress" else self.params
        async for chunk in self.engine.generate(conversation, params):
            if chunk.delta:
                yield chunk.delta

    async def _append(
        self,
        conversation: str,
        c: _Conversation,
        messages: list[Message],
        generation_prompt: bool = False,
    ) -> None:
        for attempt in (1, 2):
            try:
                if not c.opened:
                    await self.engine.open(
                        conversation, system_prompt=await self._system_prompt(conversation)
                    )
                    c.opened = True
                await self.engine.append(
                    conversation,
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

    async def _system_prompt(self, conversation: str) -> str:
        summary = summarize.summary_text(self.data, conversation)
        if summary:
            count = await self._count()
            summary = fit([Section("summary", summary, min_tokens=30)], SUMMARY_TOKENS, count)[
                "summary"
            ]
            summary = "What happened earlier in this conversation: " + summary
        return prompts.render("narrator", summary=summary).strip()

    async def _count(self) -> TokenCounter:
        return await self._counter.get()

    # -- summaries ---------------------------------------------------------------------------

    def _schedule_summary(self, conversation: str) -> None:
        if conversation in self._summarizing:
            self._resummarize.add(conversation)  # the running update goes round once more
            return
        assert self._tg is not None
        self._summarizing.add(conversation)
        self._tg.start_soon(self._summarize, conversation)

    async def _summarize(self, conversation: str) -> None:
        c = self.conversations[conversation]
        try:
            while True:
                self._resummarize.discard(conversation)
                await anyio.sleep(SUMMARY_QUIET_S)
                if conversation in self._resummarize or c.current or c.queue:
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
