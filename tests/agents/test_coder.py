"""The coder agent: code from the model's reply, one retry with the error in the prompt,
the task contract as a real process on a real broker, and (slow) the real model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import msgspec
import psutil
import pytest

from agents.base import Task, TaskFailed
from agents.coder import CoderAgent, CoderPrompt, extract_code
from engine.client import EngineUnavailable
from engine.protocol import Message
from engine.sampling import SamplingParams
from runtime import messages as m
from runtime.paths import DataDir, Endpoints, write_atomic
from tests.agents.test_agent_runtime import controller, states_of
from tests.conftest import BrokerProcess, wait_for_engine

# -- the reply and the prompt ------------------------------------------------------------


def test_code_comes_from_the_first_python_fence() -> None:
    reply = "Here you go:\n```python\nprint(1)\n```\nAnd an example:\n```python\nprint(2)\n```"
    assert extract_code(reply) == "print(1)\n"


def test_blocks_in_other_languages_are_passed_over() -> None:
    reply = "First:\n```bash\npip install x\n```\n```python\nprint(3)\n```"
    assert extract_code(reply) == "print(3)\n"
    assert extract_code("```\nprint(4)\n```") == "print(4)\n"


def test_an_unclosed_fence_runs_to_the_end_of_the_reply() -> None:
    assert extract_code("```py\nx = 1\nprint(x)") == "x = 1\nprint(x)\n"


def test_a_bare_reply_is_code_only_if_it_parses() -> None:
    assert extract_code("print(6 * 7)") == "print(6 * 7)\n"
    assert extract_code("The answer is 42.") is None
    assert extract_code("  ") is None
    assert extract_code("```python\n\n```") is None


def test_the_prompt_file_fills_its_slots_and_keeps_braces_in_values() -> None:
    prompt = CoderPrompt.load()
    first = prompt.messages("add {a} and {b}")
    assert [msg.role for msg in first] == ["system", "user"]
    assert "add {a} and {b}" in first[1].content and "```python" in first[0].content
    retry = prompt.messages("the task", previous_code="print({1: 2})", error="boom: KeyError")
    assert "the task" in retry[1].content
    assert "print({1: 2})" in retry[1].content and "boom: KeyError" in retry[1].content


def test_a_prompt_file_without_a_part_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "coder.md"
    broken.write_text("## system\nx\n## task\n{task}\n")
    with pytest.raises(ValueError, match="## retry"):
        CoderPrompt.load(broken)


# -- the retry loop, with a scripted engine ----------------------------------------------


class ScriptedEngine:
    """Stands in for ``engine.Client``: answers with ``replies`` in turn, keeps the prompts."""

    def __init__(self, replies: list[str] | None = None, error: Exception | None = None) -> None:
        self.replies = list(replies or [])
        self.error = error
        self.prompts: list[list[Message]] = []

    def __call__(self, identity: str, endpoint: str, key_dir: Path, **kw: float) -> Self:
        assert identity == "coder" and endpoint.endswith("engine.sock")
        return self

    async def __aenter__(self) -> Self:
        if self.error is not None:
            raise self.error
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    async def complete_text(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[Message],
    ) -> str:
        self.prompts.append(messages)
        return self.replies.pop(0)


@pytest.fixture
def coder() -> tuple[CoderAgent, list[m.TaskUpdate]]:
    """A coder agent in this process; its progress updates are collected."""
    agent = CoderAgent()
    updates: list[m.TaskUpdate] = []

    async def publish(topic: str, body: m.Body, task: str | None, conversation: str | None) -> None:
        if isinstance(body, m.TaskUpdate):
            updates.append(body)

    agent.attach(publish)
    return agent, updates


def use_engine(monkeypatch: pytest.MonkeyPatch, engine: ScriptedEngine) -> ScriptedEngine:
    monkeypatch.setattr("agents.coder.Client", engine)
    return engine


TASK = Task(id="t1", kind="code", text="print the answer to everything")


async def test_a_working_first_program_is_the_result(
    coder: tuple[CoderAgent, list[m.TaskUpdate]], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, updates = coder
    engine = use_engine(monkeypatch, ScriptedEngine(["```python\nprint(6 * 7)\n```"]))
    result = await agent.on_task(TASK)
    assert result.data["stdout"] == "42\n" and result.data["exit_code"] == 0
    assert result.data["attempts"] == 1 and result.data["code"] == "print(6 * 7)\n"
    assert result.message == "the program ran: 42" and result.artefacts == ["program.py"]
    assert [u.message for u in updates] == ["writing code", "running"]
    assert len(engine.prompts) == 1 and TASK.text in engine.prompts[0][1].content


async def test_a_failing_program_is_retried_once_with_its_error(
    coder: tuple[CoderAgent, list[m.TaskUpdate]], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, updates = coder
    engine = use_engine(
        monkeypatch,
        ScriptedEngine(["```python\nprint(1 / 0)\n```", "```python\nprint(1 / 1)\n```"]),
    )
    result = await agent.on_task(TASK)
    assert result.data["attempts"] == 2 and result.data["stdout"] == "1.0\n"
    second = engine.prompts[1][1].content
    assert "print(1 / 0)" in second and "ZeroDivisionError" in second
    assert "exited with status 1" in second
    assert "retrying: the program exited with status 1" in [u.message for u in updates]


async def test_two_failures_fail_the_task_with_the_stderr_tail(
    coder: tuple[CoderAgent, list[m.TaskUpdate]], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, _ = coder
    engine = use_engine(
        monkeypatch,
        ScriptedEngine(
            ["```python\nimport nosuchmodule\n```", "```python\nraise KeyError('k')\n```"]
        ),
    )
    with pytest.raises(TaskFailed, match="after 2 attempts") as failed:
        await agent.on_task(TASK)
    assert "KeyError: 'k'" in str(failed.value)
    assert len(engine.prompts) == 2 and "ModuleNotFoundError" in engine.prompts[1][1].content


async def test_a_reply_without_code_counts_as_a_failed_attempt(
    coder: tuple[CoderAgent, list[m.TaskUpdate]], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, updates = coder
    engine = use_engine(
        monkeypatch, ScriptedEngine(["I would rather not.", "```python\nprint('ok')\n```"])
    )
    result = await agent.on_task(TASK)
    assert result.data["attempts"] == 2 and result.data["stdout"] == "ok\n"
    assert "no Python code" in engine.prompts[1][1].content
    assert "retrying: the reply had no Python code" in [u.message for u in updates]


async def test_a_program_that_runs_too_long_is_retried_as_a_failure(
    coder: tuple[CoderAgent, list[m.TaskUpdate]], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, _ = coder
    engine = use_engine(
        monkeypatch,
        ScriptedEngine(["```python\nwhile True: pass\n```", "```python\nprint('done')\n```"]),
    )
    task = Task(id="t2", kind="code", text="loop", params={"timeout_s": "0.5"})
    result = await agent.on_task(task)
    assert result.data["attempts"] == 2
    assert "timed out" in engine.prompts[1][1].content


@pytest.mark.parametrize("bad", ["soon", "0", "-1", "3600"])
async def test_a_bad_timeout_param_fails_the_task_saying_so(
    coder: tuple[CoderAgent, list[m.TaskUpdate]], bad: str
) -> None:
    agent, _ = coder
    with pytest.raises(TaskFailed, match="timeout_s must be"):
        await agent.on_task(
            Task(id="t3", kind="code", text="x", params={"code": "pass", "timeout_s": bad})
        )


async def test_an_unreachable_engine_fails_the_task_saying_so(
    coder: tuple[CoderAgent, list[m.TaskUpdate]], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, _ = coder
    use_engine(monkeypatch, ScriptedEngine(error=EngineUnavailable("no reply in 60 s")))
    with pytest.raises(TaskFailed, match="engine serve"):
        await agent.on_task(TASK)


async def test_without_an_engine_in_the_instance_a_task_fails_at_once(
    coder: tuple[CoderAgent, list[m.TaskUpdate]], data: DataDir
) -> None:
    agent, _ = coder
    endpoints = Endpoints(pub="ipc:///x", sub="ipc:///y", engine=None, broker_public_key="k")
    write_atomic(data.endpoints_file, msgspec.json.encode(endpoints))
    agent.data_dir = str(data.root)
    with anyio.fail_after(5), pytest.raises(TaskFailed, match="without an engine"):
        await agent.on_task(TASK)


# -- the real agent process on a real broker ---------------------------------------------


def start_coder(data: DataDir, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with (data.root / "agent.stderr").open("ab") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime",
                "agent",
                "coder",
                "--connect",
                str(data.root),
                "--impl",
                "agents.coder:CoderAgent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=os.environ | (env or {}),
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


@pytest.fixture
def coder_process(data: DataDir, broker: BrokerProcess) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_coder(data)
    yield proc
    stop(proc)


def programs_under(pid: int) -> list[psutil.Process]:
    """Sandboxed programs descending from ``pid`` (the bootstrap's children and theirs)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            if "program.py" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


async def until(condition: Callable[[], bool], timeout: float) -> None:
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def test_given_code_runs_and_comes_back_as_the_result(
    data: DataDir, coder_process: subprocess.Popen[bytes]
) -> None:
    async with controller(data) as (bus, updates):
        await bus.publish(
            "task.assign.coder",
            m.TaskAssign(task="c1", kind="code", text="multiply", params={"code": "print(6*7)"}),
        )
        seen = await states_of(updates, "c1", {"result", "failed"})
    final = seen[-1]
    assert final.state == "result", final
    assert final.data["stdout"] == "42\n" and final.data["exit_code"] == 0
    assert final.data["code"] == "print(6*7)" and final.data["attempts"] == 1
    assert final.artefacts == ["program.py"]
    assert "running" in [u.message for u in seen if u.state == "progress"]


async def test_given_code_that_fails_fails_the_task_with_its_error(
    data: DataDir, coder_process: subprocess.Popen[bytes]
) -> None:
    async with controller(data) as (bus, updates):
        await bus.publish(
            "task.assign.coder",
            m.TaskAssign(task="c2", kind="code", text="divide", params={"code": "1/0"}),
        )
        seen = await states_of(updates, "c2", {"result", "failed"})
    assert seen[-1].state == "failed"
    assert "exited with status 1" in seen[-1].message
    assert "ZeroDivisionError" in seen[-1].message


async def test_cancelling_the_task_kills_its_program(
    data: DataDir, coder_process: subprocess.Popen[bytes]
) -> None:
    code = "import time\ntime.sleep(60)"
    async with controller(data) as (bus, updates):
        await bus.publish(
            "task.assign.coder",
            m.TaskAssign(
                task="c3", kind="code", text="wait", params={"code": code, "timeout_s": "50"}
            ),
        )
        await until(lambda: bool(programs_under(coder_process.pid)), 15)
        await bus.publish("task.assign.coder", m.TaskCancel(task="c3", reason="changed my mind"))
        seen = await states_of(updates, "c3", {"cancelled", "result", "failed"})
    assert seen[-1].state == "cancelled" and seen[-1].message == "changed my mind"
    await until(lambda: not programs_under(coder_process.pid), 5)


# -- the real model ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_the_real_model_writes_and_runs_a_program(
    data: DataDir, broker: BrokerProcess, engine_process: subprocess.Popen[bytes]
) -> None:
    """SmolLM2-135M, greedy: the pipeline runs end to end (code written, run in the
    sandbox, retried with the error if it failed). Greedy decoding writes a correct
    program here on the first try, so a result must print 385; a failure must come
    after the retry. (Sampled at temperature 0.7 the model is right far less often.)"""
    await wait_for_engine(data, engine_process, 180)
    agent = start_coder(data, {"CHORUS_DATA_DIR": str(data.root)})
    try:
        async with controller(data) as (bus, updates):
            await bus.publish(
                "task.assign.coder",
                m.TaskAssign(
                    task="real",
                    kind="code",
                    text="compute the sum of the squares of 1..10 in Python and print it",
                    deadline_s=800,
                ),
            )
            seen = await states_of(updates, "real", {"result", "failed", "cancelled"}, 840)
    finally:
        stop(agent)
    final = seen[-1]
    progress = [u.message for u in seen if u.state == "progress"]
    assert progress[:2] == ["writing code", "running"] or progress[0] == "writing code"
    report: dict[str, Any] = {"state": final.state, "message": final.message, **final.data}
    print("real model:", report)
    if final.state == "result":
        assert final.data["code"].strip() and final.data["exit_code"] == 0
        assert "385" in final.data["stdout"], report
    else:
        assert final.state == "failed", report
        assert "after 2 attempts" in final.message
        assert any(p.startswith("retrying: ") for p in progress)
