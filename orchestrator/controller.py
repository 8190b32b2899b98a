"""The controller: turns user turns into tasks, and decides when the narrator speaks.

It reads ``user.in``, ``task.update``, ``heartbeat.*``, ``narrator.decision`` and
``sys.*``; writes tasks into the task graph; publishes ``task.assign.<agent>`` and
``narrator.cue`` (both at-least-once) and every decision on ``narrator.decision``.
The rules of speaking live in :mod:`orchestrator.gating`; this module is the plumbing.

A controller that starts takes over what the one before it left: unfinished tasks from
the task graph, and user turns it never routed and cues the narrator never finished
from the bus log (:mod:`orchestrator.recovery`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
import msgspec
import structlog

from engine.client import Client, EngineError, EngineUnavailable
from runtime import messages as m
from runtime.bus import Bus
from runtime.errors import ChorusError
from runtime.paths import DataDir
from runtime.recent import RecentIds

from . import recovery
from .budget import Section, fit
from .gating import Gate, GateConfig, Out, TaskEvent
from .log import summarize
from .process import heartbeat_loop
from .routing import Route, keyword_route, model_route
from .task_graph import TaskGraph, TaskGraphError
from .tokens import EngineCounter

log = structlog.get_logger("controller")

TICK_S = 0.2
MISSED_HEARTBEATS_S = 5.0
# an agent idle this long (no task running or queued) no longer holds a task it was
# given: the update that finished it was lost (a broker restart drops what is in flight)
ORPHANED_S = 5.0
ROUTING_SUMMARY_TOKENS = 120  # of the conversation's summary in the routing prompt
NOTICE_ACTIVE_S = 900.0  # conversations with a user turn this recent hear of system faults
NOTICE_EVERY_S = 300.0  # at most one notice of a kind per conversation in this long
FORGET_EVERY_S = 60.0  # how often records of quiet conversations are dropped
TURNS_SEEN = 10_000  # user turn ids remembered, so a turn recovered from the log runs once
# per task kind: how many attempts, and the deadline of each
ATTEMPTS = {"coder": 2, "search": 2, "rag": 2}
# generous: on a busy 2-core CPU a 200-token answer from the rag agent takes minutes
DEADLINE_S = {"coder": 180.0, "search": 30.0, "rag": 300.0}
ACKS = {
    "coder": "the coder",
    "search": "the search agent",
    "rag": "the documentation reader",
}


@dataclass
class TrackedTask:
    id: str
    conversation: str
    agent: str
    text: str
    attempt: int = 1
    started: float = field(default_factory=time.monotonic)
    done: bool = False
    running: bool = False  # its agent said it accepted it


class Controller:
    """Serves until cancelled; ``engine`` may be None (keyword routing only)."""

    def __init__(
        self, bus: Bus, data: DataDir, engine: Client | None, gate: Gate | None = None
    ) -> None:
        self.bus = bus
        self.data = data
        self.engine = engine
        self.gate = gate or Gate(time.monotonic, GateConfig())
        self.graph = TaskGraph.at(data.root)
        self.tasks: dict[str, TrackedTask] = {}
        self.last_seen: dict[str, float] = {}
        self.engine_ok = engine is not None
        self.counter = EngineCounter(engine)
        self.active: dict[str, float] = {}  # conversation -> its last user turn (monotonic)
        self._told: dict[tuple[str, str], float] = {}  # (conversation, playbook) -> when
        self._storage_fault: tuple[str, float] | None = None  # the last one: reason, when
        self.idle_since: dict[str, float] = {}  # agent -> since when it holds no task
        # cues sent and not yet finished by the narrator: envelope id -> (conversation, cue)
        self.unfinished: dict[str, tuple[str, m.Cue]] = {}
        self._turns_seen = RecentIds(TURNS_SEEN)

    async def run(self) -> None:
        served = self._adopt()
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat_loop, self.bus, "controller", self._state)
            tg.start_soon(self._tick_loop)
            tg.start_soon(self._recover, served)
            for prefix, handler in (
                ("user.in", self._on_user_turn),
                ("task.update", self._on_task_update),
                ("heartbeat.", self._on_heartbeat),
                ("narrator.decision", self._on_decision),
                ("sys.", self._on_sys),
                ("event.", self._on_event),
            ):
                tg.start_soon(self._consume, prefix, handler)

    def _state(self) -> tuple[str, str | None, int]:
        running = [t for t in self.tasks.values() if not t.done]
        return ("busy" if running else "idle", running[0].id if running else None, len(running))

    async def _consume(self, prefix: str, handler: object) -> None:
        with self.bus.subscribe(prefix) as sub:
            async for envelope in sub:
                try:
                    await handler(envelope)  # type: ignore[operator]
                except ChorusError as exc:  # one bad event must not stop the controller
                    log.warning("event_failed", topic=envelope.topic, error=str(exc))

    async def _emit(self, outs: list[Out]) -> None:
        for out in outs:
            topic = "narrator.cue" if isinstance(out.body, m.Cue) else "narrator.decision"
            sent = await self.bus.publish(topic, out.body, conversation=out.conversation)
            if isinstance(out.body, m.Cue):
                self.unfinished[sent.id] = (out.conversation, out.body)

    def _adopt(self) -> set[str]:
        """Take over the tasks a previous controller left unfinished in the task graph,
        so their results still reach the user (they are not retried: their text is not
        kept; a failure is final). Returns the user turns the graph has tasks for."""
        try:
            nodes = self.graph.nodes()
        except (TaskGraphError, OSError) as exc:
            log.warning("task_graph_unreadable", error=str(exc))
            return set()
        for node in nodes:
            if node.state not in ("queued", "assigned", "running") or node.agent is None:
                continue
            conversation = node.conversation or node.id
            task = TrackedTask(node.id, conversation, node.agent, "", ATTEMPTS.get(node.agent, 1))
            task.running = node.state == "running"
            self.tasks[node.id] = task
            self.gate.task_started(conversation, node.id, node.turn or "")
            if node.state == "queued":  # never handed out: its idle agent's check fails it
                try:
                    self.graph.transition(node.id, "assigned", agent=node.agent)
                except (TaskGraphError, OSError) as exc:
                    log.warning("task_graph_transition_failed", task=node.id, error=str(exc))
            log.info("task_adopted", task=node.id, state=node.state, agent=node.agent)
        return {node.turn for node in nodes if node.turn}

    async def _recover(self, served: set[str]) -> None:
        """Handle the user turns a previous controller acknowledged but never routed, and
        keep the cues the narrator never finished, both read from the bus log."""
        found = await anyio.to_thread.run_sync(recovery.read, self.data.logs, served)
        self.unfinished = found.unfinished | self.unfinished
        for envelope in found.turns:
            assert isinstance(envelope.body, m.UserTurn)
            conversation = envelope.conversation or envelope.id
            log.info("turn_recovered", conversation=conversation, turn=envelope.id)
            if recovery.redacted(envelope.body.text):  # its words are gone: ask again
                if self._first_time(envelope.id):
                    self.active[conversation] = time.monotonic()
                    lost = self.gate.turn_lost(conversation, envelope.id, "controller_restarted")
                    await self._emit(lost)
            else:
                await self._on_user_turn(envelope)

    # -- user turns --------------------------------------------------------------------------

    def _first_time(self, turn: str) -> bool:
        """Whether user turn ``turn`` is new here (the log and a re-send may both bring it)."""
        return self._turns_seen.add(turn)

    async def _on_user_turn(self, envelope: m.Envelope) -> None:
        if not isinstance(envelope.body, m.UserTurn) or not self._first_time(envelope.id):
            return
        conversation = envelope.conversation or envelope.id
        self.active[conversation] = time.monotonic()
        # the narrator drops what it had queued for this conversation when the user speaks
        self.unfinished = {k: v for k, v in self.unfinished.items() if v[0] != conversation}
        text = envelope.body.text
        route = self._available(await self._route(text, conversation))
        log.info("routed", conversation=conversation, agents=route.agents, method=route.method)
        task_ids = [
            await self._assign(conversation, agent, route.subtasks[agent], turn=envelope.id)
            for agent in route.agents
        ]
        cue_kind: m.CueKind = "ack" if task_ids else "answer"
        outs = self.gate.user_turn(
            conversation, text, tasks=task_ids, kind=cue_kind, turn=envelope.id
        )
        if task_ids:
            names = " and ".join(ACKS[a] for a in route.agents)
            outs = [
                Out(o.conversation, _with_cover(o.body, [f"asked {names}"]))
                if isinstance(o.body, m.Cue)
                else o
                for o in outs
            ]
        await self._emit(outs)
        if self._storage_fault is not None:  # a writer failed lately: tell newcomers too
            reason, at = self._storage_fault
            if time.monotonic() - at < NOTICE_EVERY_S:
                await self._tell(conversation, "storage_failed", reason)

    def _available(self, route: Route) -> Route:
        """Only agents that are alive (a heartbeat in the last few seconds) get tasks;
        with none of them up, the narrator answers by itself."""
        now = time.monotonic()
        alive = [a for a in route.agents if now - self.last_seen.get(a, -1e9) < MISSED_HEARTBEATS_S]
        if alive == route.agents:
            return route
        log.warning("agents_unavailable", wanted=route.agents, alive=alive)
        return msgspec.structs.replace(
            route, agents=alive, subtasks={a: route.subtasks[a] for a in alive}
        )

    async def _route(self, text: str, conversation: str) -> Route:
        """Clear keyword signals win; the model decides what they leave open, with the
        conversation's rolling summary for context. (Measured in benchmarks/routing.py:
        the 135M default model routes far worse than the keyword rules where those
        match, so it only breaks their ties.)"""
        keywords = keyword_route(text)
        if keywords.method == "small_talk" or keywords.confident:
            return keywords
        if self.engine is not None:
            try:
                with anyio.fail_after(15):
                    summary = await self._summary(conversation)
                    route = await model_route(self.engine, text, summary)
                self.engine_ok = True
                return route
            except (EngineError, EngineUnavailable, TimeoutError) as exc:
                self.engine_ok = False
                log.warning("model_routing_failed", error=str(exc))
        return keywords

    async def _summary(self, conversation: str) -> str:
        """The conversation's rolling summary, fitted to ``ROUTING_SUMMARY_TOKENS``."""
        summary = summarize.summary_text(self.data, conversation)
        if not summary:
            return ""
        count = await self.counter.get()
        section = Section("summary", summary, min_tokens=20)
        return fit([section], ROUTING_SUMMARY_TOKENS, count)["summary"]

    async def _assign(
        self,
        conversation: str,
        agent: str,
        text: str,
        attempt: int = 1,
        task_id: str | None = None,
        turn: str | None = None,
    ) -> str:
        task_id = task_id or f"{agent}-{m.new_id()[:12]}"
        try:
            if attempt == 1:
                self.graph.add(
                    task_id, kind=agent, conversation=conversation, agent=agent, turn=turn
                )
            else:
                self.graph.transition(task_id, "queued", error="retrying")
            self.graph.transition(task_id, "assigned", agent=agent)
        except TaskGraphError as exc:  # the graph is a record; work goes on without it
            log.error("task_graph_write_failed", task=task_id, error=str(exc))
        except OSError as exc:
            await self._storage_failed(f"the task graph could not be written: {exc}")
        self.tasks[task_id] = TrackedTask(task_id, conversation, agent, text, attempt)
        self.gate.task_started(conversation, task_id)
        assign = m.TaskAssign(
            task=task_id,
            kind=agent,
            text=text,
            attempt=attempt,
            deadline_s=DEADLINE_S.get(agent, 60.0),
        )
        await self.bus.publish(
            f"task.assign.{agent}", assign, conversation=conversation, task=task_id
        )
        return task_id

    # -- agents ------------------------------------------------------------------------------

    async def _on_task_update(self, envelope: m.Envelope) -> None:
        body = envelope.body
        if not isinstance(body, m.TaskUpdate):
            return
        task = self.tasks.get(body.task)
        if task is None or task.done:
            return
        if envelope.sender != task.agent:  # the ACL lets any worker speak on task.update
            why = f"{envelope.sender} sent an update of task {task.id}, which {task.agent} holds"
            log.warning("task_update_not_from_holder", task=task.id, sender=envelope.sender)
            await self.bus.publish("event.controller", m.Fault(kind="bad_input", message=why))
            return
        self.last_seen[task.agent] = time.monotonic()
        if body.state != "accepted" and not task.running:
            # it ran, though its `accepted` was lost: the graph must pass through running
            await self._record(task.id, "running")
        task.running = True
        match body.state:
            case "accepted":
                await self._record(task.id, "running")
            case "progress":
                await self._emit(
                    self.gate.task_event(
                        task.conversation,
                        TaskEvent(task.id, "progress", body.message, time.monotonic()),
                    )
                )
            case "result":
                self._done(task)
                await self._record(task.id, "succeeded", result=body.message[:500])
                text = _result_text(task.agent, body)
                event = TaskEvent(
                    task.id,
                    "result",
                    text,
                    time.monotonic(),
                    sources=body.sources,
                    attachments=_attachments(task.agent, body),
                )
                await self._emit(self.gate.task_event(task.conversation, event))
            case "failed" | "cancelled":
                await self._failed(task, body.message or body.state)

    def _done(self, task: TrackedTask) -> None:
        """No more work on ``task`` (a retry is tracked afresh); later updates of it are
        ignored."""
        task.done = True
        self.tasks.pop(task.id, None)

    async def _failed(self, task: TrackedTask, reason: str, playbook: str = "") -> None:
        self._done(task)
        if task.attempt < ATTEMPTS.get(task.agent, 1):
            log.info("task_retry", task=task.id, reason=reason)
            await self._record(task.id, "failed", error=reason)
            if playbook:
                event = TaskEvent(
                    task.id,
                    "progress",
                    f"retrying after: {reason}",
                    time.monotonic(),
                    playbook=playbook,
                )
                await self._emit(self.gate.task_event(task.conversation, event))
            await self._assign(task.conversation, task.agent, task.text, task.attempt + 1, task.id)
            return
        await self._record(task.id, "failed", error=reason)
        event = TaskEvent(
            task.id, "failed", reason, time.monotonic(), playbook=playbook or "task_failed"
        )
        await self._emit(self.gate.task_event(task.conversation, event))

    async def _record(self, task_id: str, state: str, **details: str) -> None:
        try:
            self.graph.transition(task_id, state, **details)  # type: ignore[arg-type]
        except TaskGraphError as exc:
            log.warning("task_graph_transition_failed", task=task_id, to=state, error=str(exc))
        except OSError as exc:
            await self._storage_failed(f"the task graph could not be written: {exc}")

    # -- system faults -----------------------------------------------------------------------

    async def _on_event(self, envelope: m.Envelope) -> None:
        body = envelope.body
        if isinstance(body, m.Fault) and body.kind == "storage_error":
            await self._storage_failed(body.message, reported_by=envelope.sender)

    async def _storage_failed(self, reason: str, reported_by: str = "") -> None:
        """Work goes on from memory; recent conversations are told their record may
        be incomplete (once per conversation per ``NOTICE_EVERY_S``)."""
        log.error("storage_failed", reason=reason, reported_by=reported_by or "controller")
        if not reported_by:  # the controller's own write: report it like any writer
            fault = m.Fault(kind="storage_error", message=reason)
            await self.bus.publish("event.controller", fault)
        now = time.monotonic()
        self._storage_fault = (reason, now)
        for conversation, last in list(self.active.items()):
            if now - last < NOTICE_ACTIVE_S:
                await self._tell(conversation, "storage_failed", reason)

    async def _tell(self, conversation: str, playbook: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._told.get((conversation, playbook), -1e9) < NOTICE_EVERY_S:
            return
        self._told[(conversation, playbook)] = now
        await self._emit(self.gate.notice(conversation, playbook, reason))

    async def _on_heartbeat(self, envelope: m.Envelope) -> None:
        now = time.monotonic()
        self.last_seen[envelope.sender] = now
        body = envelope.body
        if isinstance(body, m.Heartbeat) and body.task is None and body.queue_depth == 0:
            self.idle_since.setdefault(envelope.sender, now)
        else:
            self.idle_since.pop(envelope.sender, None)

    async def _on_decision(self, envelope: m.Envelope) -> None:
        body = envelope.body
        if (
            envelope.sender != "narrator"
            or not isinstance(body, m.Decision)
            or envelope.conversation is None
        ):
            return
        if body.action == "spoken":
            self.gate.utterance_started(envelope.conversation, body.cue, body.reason)
        elif body.action == "finished":
            self.unfinished.pop(body.cue, None)
            await self._emit(self.gate.utterance_finished(envelope.conversation, body.cue))

    async def _on_sys(self, envelope: m.Envelope) -> None:
        body = envelope.body
        if isinstance(body, m.ConfigChange):
            try:
                known = self.gate.configure(body.key, float(body.value))
            except ValueError:
                known = False
            log.info("config", key=body.key, value=body.value, applied=known)
        elif isinstance(body, m.ProcessEvent) and body.process == "narrator":
            if envelope.topic == "sys.restart":
                await self._narrator_restarted()
        elif isinstance(body, m.ProcessEvent) and envelope.topic in ("sys.restart", "sys.gave_up"):
            playbook = "agent_crashed" if envelope.topic == "sys.restart" else "task_failed"
            # only what the dead process held: a retry assigned since then is the new one's
            crashed_before = time.monotonic() - 0.5
            held = [
                t
                for t in self.tasks.values()
                if t.agent == body.process and not t.done and t.started < crashed_before
            ]
            for task in held:
                await self._failed(task, f"{body.process} {body.reason}", playbook)

    async def _narrator_restarted(self) -> None:
        """What the narrator had not finished saying died with it: say it again, after
        a short notice, through the new narrator (cues are re-sent until acknowledged)."""
        unfinished, self.unfinished = self.unfinished, {}
        for cue_id, (conversation, cue) in unfinished.items():
            log.info("cue_resent", conversation=conversation, cue=cue_id, kind=cue.kind)
            again = msgspec.structs.replace(cue, playbook=cue.playbook or "narrator_restarted")
            await self._emit([Out(conversation, again)])
            await self._emit(self.gate.utterance_finished(conversation, cue_id))

    # -- the clock ---------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        forget_at = time.monotonic() + FORGET_EVERY_S
        while True:
            await anyio.sleep(TICK_S)
            await self._emit(self.gate.tick())
            now = time.monotonic()
            if now >= forget_at:
                forget_at = now + FORGET_EVERY_S
                self._forget(now)
            for task in [t for t in self.tasks.values() if not t.done]:
                deadline = (
                    DEADLINE_S.get(task.agent, 60.0) + 5.0
                )  # the agent's own deadline fires first
                silent = now - self.last_seen.get(task.agent, task.started)
                idle = now - max(self.idle_since.get(task.agent, now), task.started)
                if now - task.started > deadline:
                    await self._cancel(
                        task, f"passed its deadline of {deadline:g} s", "task_timeout"
                    )
                elif silent > MISSED_HEARTBEATS_S and now - task.started > MISSED_HEARTBEATS_S:
                    await self._cancel(
                        task,
                        f"{task.agent} missed its heartbeats for {silent:.0f} s",
                        "agent_crashed",
                    )
                elif idle > ORPHANED_S:
                    await self._cancel(task, f"{task.agent} no longer holds it", "")

    def _forget(self, now: float) -> None:
        """Drop per-conversation records past their use, so a controller that serves
        conversation after conversation stays the same size (the gate forgets its own)."""
        self.active = {c: at for c, at in self.active.items() if now - at < NOTICE_ACTIVE_S}
        self._told = {k: at for k, at in self._told.items() if now - at < NOTICE_EVERY_S}

    async def _cancel(self, task: TrackedTask, reason: str, playbook: str) -> None:
        await self.bus.publish(
            f"task.assign.{task.agent}",
            m.TaskCancel(task=task.id, reason=reason),
            conversation=task.conversation,
            task=task.id,
        )
        await self._failed(task, reason, playbook)


def _with_cover(cue: m.Cue | m.Decision, cover: list[str]) -> m.Cue | m.Decision:
    if not isinstance(cue, m.Cue):
        return cue
    return msgspec.structs.replace(cue, cover=cover)


def _attachments(agent: str, update: m.TaskUpdate) -> list[str]:
    """What the user sees verbatim: the program's real output, not the model's retelling."""
    if agent != "coder":
        return []
    stdout = str(update.data.get("stdout", "")).rstrip()
    return [f"Output:\n{stdout[:2000]}"] if stdout else []


def _result_text(agent: str, update: m.TaskUpdate) -> str:
    """What the narrator is told about a result: the message plus the facts that matter."""
    data = update.data
    parts = [update.message]
    if agent == "coder":
        for key in ("stdout", "stderr"):
            value = str(data.get(key, "")).strip()
            if value:
                parts.append(f"{key}: {value[:800]}")
    elif "answer" in data:
        parts.append(str(data["answer"])[:800])
    return " | ".join(p for p in parts if p)
