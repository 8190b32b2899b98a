"""Rolling summaries of conversations and their tasks, kept under ``data/summaries/``.

For each conversation: ``<conversation>.md`` for people (the summary, then one line
per task with its outcome) and ``<conversation>.json``, the sidecar, which records
the last envelope the summary covers, so the next update reads only what came after.

An update reads the log from where the sidecar stopped (user turns, the narrator's
finished utterances, task assignments and outcomes), then asks the engine to fold
the new turns into the earlier summary (``prompts/summarize.md``, fitted to a token
budget with the engine's tokenizer). When the engine cannot answer, or its summary
names a number that appears nowhere in what it summarised (a small model invents
them), the summary is extractive (the earlier summary, the first and last new user
turns, what Chorus last said) and marked ``method: extractive``. An utterance still streaming is left for the
next update, so nothing is summarised half-said.

The narrator runs an update after each turn closes and puts the summary in the
system prompt when it reopens a session; ``python -m orchestrator summarize`` runs
one by hand.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
import msgspec
import structlog

from engine.protocol import Message
from runtime import messages as m
from runtime.errors import ChorusError
from runtime.paths import DataDir, write_atomic

from .. import prompts
from ..budget import CountTokens, Section, fit
from ..routing import Completer
from .query import LogQuery, query_envelopes

log = structlog.get_logger("summarize")

Method = Literal["engine", "extractive"]

TOPICS = ("user.in", "user.out", "task.assign.", "task.update")
MAX_WORDS = 120
PROMPT_BUDGET = 700  # tokens for the prompt; the engine's window is 1024 in all
SUMMARY_TOKENS = 200  # the most the engine may write
MAX_TASKS = 50  # task lines kept in the file, newest last
EXTRACTIVE_CHARS = 1500
SYSTEM = "You write short, factual summaries."
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


class TaskLine(msgspec.Struct, kw_only=True):
    """One task of the conversation as the summary shows it."""

    task: str
    agent: str
    text: str = ""
    state: str = "assigned"
    outcome: str = ""


class Sidecar(msgspec.Struct, kw_only=True):
    """``<conversation>.json``: what the summary covers, and how it was made."""

    conversation: str
    summary: str = ""
    method: Method = "extractive"
    last_id: str | None = None  # the last envelope covered
    last_ts: float = 0.0
    turns: int = 0  # user and Chorus turns covered, in all
    updated: float = 0.0
    tasks: list[TaskLine] = msgspec.field(default_factory=list)


@dataclass
class Turn:
    role: Literal["user", "chorus"]
    text: str


@dataclass
class NewMaterial:
    """What the log holds after the sidecar's last envelope."""

    turns: list[Turn] = field(default_factory=list)
    tasks: dict[str, TaskLine] = field(default_factory=dict)
    last_id: str | None = None
    last_ts: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.turns or self.tasks)


# -- reading -------------------------------------------------------------------------------


def paths(data: DataDir, conversation: str) -> tuple[Path, Path]:
    """The summary file and its sidecar."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in conversation)[:120]
    return data.summaries / f"{safe}.md", data.summaries / f"{safe}.json"


def read_sidecar(data: DataDir, conversation: str) -> Sidecar:
    """The sidecar, or an empty one (a damaged sidecar starts the summary over: it is
    derived from the log, which keeps everything)."""
    _, path = paths(data, conversation)
    try:
        sidecar = msgspec.json.decode(path.read_bytes(), type=Sidecar)
    except FileNotFoundError:
        return Sidecar(conversation=conversation)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("summary_sidecar_unreadable", path=str(path), error=str(exc))
        return Sidecar(conversation=conversation)
    return sidecar


def summary_text(data: DataDir, conversation: str) -> str:
    """The rolling summary and task outcomes, as prompts take them ("" if none yet)."""
    sidecar = read_sidecar(data, conversation)
    parts = [sidecar.summary.strip()] if sidecar.summary.strip() else []
    parts += [_task_line(t) for t in sidecar.tasks[-10:]]
    return "\n".join(parts)


def collect(log_dir: Path, conversation: str, after: Sidecar) -> NewMaterial:
    """Turns and task outcomes logged after the sidecar's last envelope. Stops before
    the first utterance that has not finished, so the next update starts there."""
    query = LogQuery(since=after.last_ts or None, topics=TOPICS, conversation=conversation)
    envelopes = list(query_envelopes(log_dir, query, warn=_warn))
    if after.last_id is not None:
        for i, envelope in enumerate(envelopes):
            if envelope.id == after.last_id:
                envelopes = envelopes[i + 1 :]
                break
    positioned: list[tuple[int, Turn]] = []  # (index of the first envelope, turn)
    open_streams: dict[str, tuple[int, dict[int, str]]] = {}  # by seq
    tasks: dict[str, TaskLine] = {}
    for i, envelope in enumerate(envelopes):
        body = envelope.body
        if isinstance(body, m.UserTurn) and body.text.strip():
            positioned.append((i, Turn("user", body.text.strip())))
        elif isinstance(body, m.Chunk):
            if body.again:  # said again after a broker restart: only to fill a gap
                reading = open_streams.get(body.stream)
                if reading is None or body.seq in reading[1]:
                    continue  # already here, or the stream was summarized
            start, parts = open_streams.setdefault(body.stream, (i, {}))
            parts[body.seq] = body.delta
            if body.final:
                del open_streams[body.stream]
                if text := "".join(parts[seq] for seq in sorted(parts)).strip():
                    positioned.append((start, Turn("chorus", text)))
        elif isinstance(body, m.TaskAssign):
            tasks[body.task] = TaskLine(task=body.task, agent=body.kind, text=body.text[:200])
    cut = min((start for start, _ in open_streams.values()), default=len(envelopes))
    for envelope in envelopes[:cut]:
        body = envelope.body
        if isinstance(body, m.TaskUpdate) and body.state in ("result", "failed", "cancelled"):
            line = tasks.get(body.task) or _known(after, body.task, envelope.sender)
            line.state = "succeeded" if body.state == "result" else body.state
            line.outcome = " ".join(body.message.split())[:200]
            tasks[body.task] = line
    covered = envelopes[:cut]
    covered_tasks = {e.task for e in covered}
    return NewMaterial(
        turns=[turn for start, turn in sorted(positioned, key=lambda p: p[0]) if start < cut],
        tasks={k: v for k, v in tasks.items() if k in covered_tasks},
        last_id=covered[-1].id if covered else after.last_id,
        last_ts=covered[-1].ts if covered else after.last_ts,
    )


def _known(after: Sidecar, task: str, agent: str) -> TaskLine:
    for line in after.tasks:
        if line.task == task:
            return msgspec.structs.replace(line)
    return TaskLine(task=task, agent=agent)


def _warn(message: str) -> None:
    log.warning("log_line_skipped", detail=message)


# -- writing -------------------------------------------------------------------------------


async def update(
    data: DataDir,
    conversation: str,
    engine: Completer | None,
    count: CountTokens,
    *,
    max_words: int = MAX_WORDS,
) -> Sidecar | None:
    """Bring the conversation's summary up to date; None when nothing new was logged."""
    before = read_sidecar(data, conversation)
    # reading the log can take seconds (a conversation idle for days reads every hour
    # since its last turn): off the caller's event loop, so the narrator keeps talking
    new = await anyio.to_thread.run_sync(collect, data.logs, conversation, before)
    if not new:
        return None
    method: Method = "extractive"
    text = ""
    if engine is not None and new.turns:
        try:
            text = await _engine_summary(engine, before.summary, new.turns, count, max_words)
            method = "engine"
        except ChorusError as exc:
            log.info("summary_extractive", conversation=conversation, reason=str(exc))
        invented = _invented_numbers(text, before.summary + "\n" + _turn_lines(new.turns))
        if invented:
            log.info("summary_extractive", conversation=conversation, invented=invented)
            text = ""
    if not text:
        text = _extractive(before.summary, new.turns) if new.turns else before.summary
        method = "extractive" if new.turns else before.method
    tasks = {t.task: t for t in before.tasks}
    tasks.update(new.tasks)
    sidecar = Sidecar(
        conversation=conversation,
        summary=text,
        method=method,
        last_id=new.last_id,
        last_ts=new.last_ts,
        turns=before.turns + len(new.turns),
        updated=time.time(),
        tasks=list(tasks.values())[-MAX_TASKS:],
    )
    md, side = paths(data, conversation)
    write_atomic(md, render(sidecar).encode())
    write_atomic(side, msgspec.json.format(msgspec.json.encode(sidecar)))
    return sidecar


async def _engine_summary(
    engine: Completer, earlier: str, turns: list[Turn], count: CountTokens, max_words: int
) -> str:
    from engine.sampling import SamplingParams

    template = prompts.template("summarize")
    fitted = fit(
        [
            Section("summary", earlier or "(none)", priority=2, min_tokens=40),
            Section("recent_turns", _turn_lines(turns), priority=1, min_tokens=60),
        ],
        PROMPT_BUDGET - count(template),
        count,
    )
    prompt = prompts.render("summarize", max_words=str(max_words), **fitted)
    # a small model goes on to invent new turns: stop where it starts one
    params = SamplingParams(temperature=0, max_tokens=SUMMARY_TOKENS, stop=["\nUser", "\nuser"])
    messages = [Message(role="system", content=SYSTEM), Message(role="user", content=prompt)]
    text = await engine.complete_text(params=params, messages=messages, background=True)
    lines = dict.fromkeys(" ".join(line.split()) for line in text.splitlines())  # no repeats
    return _trim_words(" ".join(line for line in lines if line), max_words)


def _invented_numbers(summary: str, source: str) -> list[str]:
    """Numbers in ``summary`` that ``source`` never mentions."""
    known = set(NUMBER.findall(source))
    return [n for n in dict.fromkeys(NUMBER.findall(summary)) if n not in known]


def _turn_lines(turns: Iterable[Turn]) -> str:
    return "\n".join(f"{t.role}: {' '.join(t.text.split())}" for t in turns)


def _trim_words(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " …"


def _extractive(earlier: str, turns: list[Turn]) -> str:
    users = [t.text for t in turns if t.role == "user"]
    replies = [t.text for t in turns if t.role == "chorus"]
    parts = [earlier.strip()] if earlier.strip() else []
    if users:
        parts.append(f'The user asked: "{_clip(users[0])}"')
        if len(users) > 1:
            parts.append(f'Most recently: "{_clip(users[-1])}"')
    if replies:
        parts.append(f'Chorus last said: "{_clip(replies[-1])}"')
    text = " ".join(parts)
    return text if len(text) <= EXTRACTIVE_CHARS else "…" + text[-EXTRACTIVE_CHARS:]


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _task_line(t: TaskLine) -> str:
    outcome = f": {t.outcome}" if t.outcome else ""
    return f"- {t.task} ({t.agent}) {t.state}{outcome}"


def render(sidecar: Sidecar) -> str:
    """The human-readable summary file."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sidecar.updated))
    lines = [
        f"# Conversation {sidecar.conversation}",
        "",
        f"_method: {sidecar.method} · {sidecar.turns} turns · up to envelope "
        f"{sidecar.last_id} · updated {stamp}_",
        "",
        sidecar.summary or "(nothing said yet)",
    ]
    if sidecar.tasks:
        lines += ["", "## Tasks", ""] + [_task_line(t) for t in sidecar.tasks]
    return "\n".join(lines) + "\n"


def conversations(log_dir: Path, since: float | None = None) -> list[str]:
    """Conversations with user turns in the log (since ``since``), oldest first."""
    seen: dict[str, None] = {}
    for envelope in query_envelopes(log_dir, LogQuery(since=since, topics=("user.in",))):
        if envelope.conversation:
            seen[envelope.conversation] = None
    return list(seen)
