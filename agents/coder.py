"""The coder agent: writes a Python program for the task with the engine, runs it in
the sandbox (``agents.sandbox``) and hands back the code, its output and its status.

A failed program (non-zero exit, killed, timed out, or no code in the reply) gets one
more try, with the failure in the prompt; a second failure fails the task. A task whose
``params`` carry ``code`` skips the engine and runs that code once.

Task params: ``code`` (run this, no model), ``timeout_s`` (wall-clock limit of a run,
at most :data:`MAX_TIMEOUT_S`).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import structlog

from engine.client import Client, EngineError, EngineUnavailable
from engine.protocol import Message
from engine.sampling import SamplingParams
from runtime.paths import DataDir

from .base import Agent, Task, TaskFailed, TaskResult
from .sandbox import SandboxResult, run_python

log = structlog.get_logger("coder")

PROMPT_FILE = Path(__file__).resolve().parent.parent / "prompts" / "coder.md"
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 60.0
ERROR_TAIL_CHARS = 800  # of stderr, in the retry prompt and the failure reason
PYTHON_TAGS = ("python", "python3", "py", "")  # fence tags taken as Python


@dataclass(frozen=True)
class CoderPrompt:
    """The three parts of ``prompts/coder.md``: ``system``, ``task`` and ``retry``."""

    system: str
    task: str
    retry: str

    @classmethod
    def load(cls, path: Path = PROMPT_FILE) -> CoderPrompt:
        """Read the parts under the file's ``## system``, ``## task``, ``## retry`` headings."""
        parts: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("## "):
                current = parts.setdefault(line[3:].strip().lower(), [])
            elif current is not None:
                current.append(line)
        missing = {"system", "task", "retry"} - parts.keys()
        if missing:
            raise ValueError(f"{path} has no ## {', ## '.join(sorted(missing))} part")
        text = {name: "\n".join(lines).strip() for name, lines in parts.items()}
        return cls(system=text["system"], task=text["task"], retry=text["retry"])

    def messages(
        self, task: str, previous_code: str | None = None, error: str = ""
    ) -> list[Message]:
        """The chat for a first try, or for a retry when ``previous_code`` is given."""
        if previous_code is None:
            user = self.task.format(task=task)
        else:
            user = self.retry.format(task=task, previous_code=previous_code, error=error)
        return [Message(role="system", content=self.system), Message(role="user", content=user)]


def fenced_blocks(reply: str) -> list[tuple[str, str]]:
    """``(tag, body)`` of each fenced block, in order; an unclosed one runs to the end."""
    blocks: list[tuple[str, str]] = []
    tag: str | None = None
    body: list[str] = []
    for line in reply.splitlines():
        if line.lstrip().startswith("```"):
            if tag is None:
                tag, body = line.lstrip()[3:].strip().lower(), []
            else:
                blocks.append((tag, "\n".join(body)))
                tag = None
        elif tag is not None:
            body.append(line)
    if tag is not None:
        blocks.append((tag, "\n".join(body)))
    return blocks


def extract_code(reply: str) -> str | None:
    """The program in a model's reply: the first non-empty fenced block tagged Python (or
    untagged), else the whole reply if it parses as Python, else None."""
    for tag, body in fenced_blocks(reply):
        if tag in PYTHON_TAGS and body.strip():
            return body.strip("\n") + "\n"
    text = reply.strip()
    if not text:
        return None
    try:
        ast.parse(text)
    except SyntaxError:
        return None
    return text + "\n"


def failure_text(result: SandboxResult) -> str:
    """How a run failed, for the retry prompt and the task's failure reason."""
    text = f"the program {result.describe()}"
    tail = result.stderr.strip()[-ERROR_TAIL_CHARS:]
    return f"{text}. Its stderr ends with:\n{tail}" if tail else f"{text} and printed no error."


def run_timeout(task: Task) -> float:
    """The task's ``timeout_s`` param, within (0, MAX_TIMEOUT_S]; the default without one."""
    text = task.params.get("timeout_s")
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= MAX_TIMEOUT_S:
        raise TaskFailed(
            f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], not {text!r}"
        )
    return value


class CoderAgent(Agent):
    """Writes Python for a task with the engine, runs it sandboxed, retries once."""

    name = "coder"
    prompt_file: ClassVar[Path] = PROMPT_FILE
    # greedy: the small default model is at its most reliable there; the stop string
    # ends the reply at the closing fence, before the explanation small models add
    sampling: ClassVar[SamplingParams] = SamplingParams(
        temperature=0, max_tokens=400, stop=["```\n\n"]
    )

    def __init__(self) -> None:
        super().__init__()
        self.prompt = CoderPrompt.load(self.prompt_file)
        self.data_dir = os.environ.get("CHORUS_DATA_DIR", "data")

    async def on_start(self) -> None:
        """Check once what isolation this host gives the sandbox, and say so."""
        try:
            probe = await run_python("pass", timeout_s=30)
        except Exception as exc:  # a broken sandbox fails tasks, not the agent's start
            await self.fault("sandbox", f"the sandbox cannot start a program: {exc}")
            return
        await self.emit("sandbox", {"isolation": list(probe.isolation), "ok": probe.ok})
        if not probe.ok or not {"net", "fs"} <= set(probe.isolation):
            await self.fault(
                "sandbox",
                f"the sandbox runs with isolation {list(probe.isolation)} only "
                f"({probe.describe()}); see docs/agents-coder.md",
            )

    async def on_task(self, task: Task) -> TaskResult:
        timeout_s = run_timeout(task)
        if "code" in task.params:  # already written: just run it
            code = task.params["code"]
            await self.progress(task, "running", 0.5)
            result = await run_python(code, timeout_s=timeout_s)
            if not result.ok:
                raise TaskFailed(failure_text(result))
            return self._result(code, result, attempts=1)
        return await self._write_and_run(task, timeout_s)

    async def _write_and_run(self, task: Task, timeout_s: float) -> TaskResult:
        if not self._has_engine():  # fail at once rather than after the client's timeout
            raise TaskFailed(
                "this instance runs without an engine (launch --no-engine), so no program "
                "can be written; a task with a `code` param still runs"
            )
        try:
            endpoint, keys = self.engine_address(self.data_dir)
            async with Client(self.name, endpoint, keys, timeout=60) as llm:
                previous: str | None = None
                error = ""
                for attempt in (1, 2):
                    await self.progress(task, "writing code", 0.1 if attempt == 1 else 0.6)
                    reply = await llm.complete_text(
                        messages=self.prompt.messages(task.text, previous, error),
                        params=self.sampling,
                    )
                    code = extract_code(reply)
                    if code is None:
                        short = "the reply had no Python code"
                        previous, error = reply.strip() or "(an empty reply)", f"{short}."
                    else:
                        await self.progress(task, "running", 0.4 if attempt == 1 else 0.8)
                        result = await run_python(code, timeout_s=timeout_s)
                        if result.ok:
                            return self._result(code, result, attempts=attempt)
                        short = f"the program {result.describe()}"
                        previous, error = code, failure_text(result)
                    log.info("attempt_failed", task=task.id, attempt=attempt, reason=short)
                    if attempt == 1:
                        await self.progress(task, f"retrying: {short}", 0.5)
        except (EngineUnavailable, EngineError) as exc:
            raise TaskFailed(
                f"the engine did not write the program: {exc} (is `python -m engine serve` "
                f"running for data directory {self.data_dir}?)"
            ) from exc
        raise TaskFailed(f"no working program after 2 attempts; the last one: {error}")

    def _has_engine(self) -> bool:
        """False only when the running instance names no engine and no engine socket
        exists either (an engine may run beside a broker that does not name it)."""
        if self.engine_endpoint is not None:  # the instance names one (endpoints.json)
            return True
        data = DataDir.at(self.data_dir)
        try:
            if data.read_endpoints().engine is not None:
                return True
        except (OSError, ValueError):  # no instance file to ask: let the client find out
            return True
        return Path(data.ipc("engine").removeprefix("ipc://")).exists()

    @staticmethod
    def _result(code: str, result: SandboxResult, attempts: int) -> TaskResult:
        lines = result.stdout.strip().splitlines()
        summary = (
            f"the program ran: {lines[-1][:200]}"
            if lines
            else "the program ran and printed nothing"
        )
        return TaskResult(
            message=summary,
            data={
                "code": code,
                "stdout": result.stdout,
                "stderr": result.stderr,
                "exit_code": result.exit_code,
                "attempts": attempts,
                "isolation": list(result.isolation),
            },
            artefacts=["program.py"],
        )
