"""Rolling summaries: what an update covers, incrementally; extractive without an engine;
made by the real engine when it is up (slow)."""

from __future__ import annotations

import subprocess

import msgspec
import pytest

from engine.client import Client
from engine.protocol import Message
from engine.sampling import SamplingParams
from orchestrator.log import summarize
from orchestrator.tokens import TokenCounter
from runtime import messages as m
from runtime.paths import DataDir
from tests.conftest import wait_for_engine
from tests.orchestrator.conftest import MakeEnvelope, WriteLog

CONV = "c1"


class Log:
    """A conversation written to ``data/logs`` as the broker would log it."""

    def __init__(self, data: DataDir, make: MakeEnvelope, write: WriteLog, ts: float) -> None:
        self.data, self.make, self.write, self.ts = data, make, write, ts
        self.streams = 0

    def add(self, topic: str, body: m.Body, sender: str, task: str | None = None) -> m.Envelope:
        self.ts += 1
        env = self.make(topic, body, ts=self.ts, sender=sender, conversation=CONV, task=task)
        self.write(self.data.logs, [env])
        return env

    def user(self, text: str) -> m.Envelope:
        return self.add("user.in", m.UserTurn(text=text), "client")

    def say(self, *parts: str, final: bool = True) -> str:
        self.streams += 1
        stream = f"s{self.streams}"
        for seq, part in enumerate(parts):
            last = final and seq == len(parts) - 1
            chunk = m.Chunk(stream=stream, seq=seq, delta=part, final=last)
            self.add("user.out", chunk, "narrator")
        return stream

    def finish(self, stream: str, seq: int) -> None:
        self.add("user.out", m.Chunk(stream=stream, seq=seq, delta="", final=True), "narrator")

    def task(self, task: str, agent: str, text: str, outcome: str) -> None:
        assign = m.TaskAssign(task=task, kind=agent, text=text)
        self.add(f"task.assign.{agent}", assign, "controller", task=task)
        done = m.TaskUpdate(task=task, state="result", message=outcome)
        self.add("task.update", done, agent, task=task)


@pytest.fixture
def conv(data: DataDir, make_envelope: MakeEnvelope, write_log: WriteLog, base_ts: float) -> Log:
    return Log(data, make_envelope, write_log, base_ts)


async def test_without_an_engine_the_summary_is_extractive_and_lists_task_outcomes(
    data: DataDir, conv: Log
) -> None:
    conv.user("What is 12 times 34?")
    conv.say("On it — I've asked the coder.")
    conv.task("coder-1", "coder", "What is 12 times 34?", "printed 408")
    conv.say("It is ", "408.")
    done = await summarize.update(data, CONV, None, TokenCounter())
    assert done is not None and done.method == "extractive"
    assert "12 times 34" in done.summary and "408" in done.summary
    assert done.turns == 3
    md, sidecar = summarize.paths(data, CONV)
    text = md.read_text()
    assert "method: extractive" in text
    assert "- coder-1 (coder) succeeded: printed 408" in text
    saved = msgspec.json.decode(sidecar.read_bytes(), type=summarize.Sidecar)
    assert saved.last_id == done.last_id and saved.last_id is not None
    assert "coder-1 (coder) succeeded" in summarize.summary_text(data, CONV)


async def test_an_update_reads_only_what_came_after_the_last_one(data: DataDir, conv: Log) -> None:
    conv.user("first question about loops")
    conv.say("Loops repeat.")
    first = await summarize.update(data, CONV, None, TokenCounter())
    assert first is not None and first.turns == 2
    assert await summarize.update(data, CONV, None, TokenCounter()) is None  # nothing new
    conv.user("second question about generators")
    conv.say("Generators yield.")
    new = summarize.collect(data.logs, CONV, summarize.read_sidecar(data, CONV))
    assert [t.text for t in new.turns] == ["second question about generators", "Generators yield."]
    second = await summarize.update(data, CONV, None, TokenCounter())
    assert second is not None and second.turns == 4
    assert "loops" in second.summary and "generators" in second.summary  # rolled, not replaced


async def test_an_utterance_still_streaming_waits_for_the_next_update(
    data: DataDir, conv: Log
) -> None:
    conv.user("tell me about decorators")
    stream = conv.say("Decorators wrap ", final=False)
    first = await summarize.update(data, CONV, None, TokenCounter())
    assert first is not None and first.turns == 1
    assert "wrap" not in first.summary
    conv.finish(stream, 1)
    second = await summarize.update(data, CONV, None, TokenCounter())
    assert second is not None and second.turns == 2
    assert "Decorators wrap" in second.summary


async def test_a_damaged_sidecar_starts_the_summary_over(data: DataDir, conv: Log) -> None:
    conv.user("a question")
    _, sidecar = summarize.paths(data, CONV)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text("{not json")
    done = await summarize.update(data, CONV, None, TokenCounter())
    assert done is not None and done.turns == 1 and "a question" in done.summary


async def test_an_unreachable_engine_falls_back_to_extractive(data: DataDir, conv: Log) -> None:
    conv.user("anything at all")
    async with Client("operator", data.ipc("engine"), data.keys, timeout=1) as engine:
        done = await summarize.update(data, CONV, engine, TokenCounter())
    assert done is not None and done.method == "extractive"


@pytest.mark.slow
async def test_with_the_engine_up_the_engine_writes_the_summary(
    data: DataDir, conv: Log, engine_process: subprocess.Popen[bytes]
) -> None:
    await wait_for_engine(data, engine_process, timeout=300)
    conv.user("How do I reverse a list in Python?")
    conv.say("Use reversed(items) or items[::-1]; list.reverse() reverses in place.")
    async with Client.connect("operator", data.root, timeout=120) as engine:
        count = await TokenCounter.from_engine(engine)
        assert count.exact  # the engine's own tokenizer, found through its stats
        done = await summarize.update(data, CONV, engine, count)
    assert done is not None and done.method == "engine"
    assert done.summary.strip()
    assert "method: engine" in summarize.paths(data, CONV)[0].read_text()


class Scripted:
    """A completer that answers a fixed text: the guard under test is ours, not the model."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.prompts: list[str] = []

    async def complete_text(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[Message] | None = None,
        background: bool = False,
    ) -> str:
        assert background  # a summary must never delay an answer
        self.prompts.append(prompt or "\n".join(msg.content for msg in messages or []))
        return self.text


async def test_a_summary_that_invents_a_number_is_replaced_by_an_extractive_one(
    data: DataDir, conv: Log
) -> None:
    conv.user("What is 12 times 34?")
    conv.say("It is 408.")
    done = await summarize.update(data, CONV, Scripted("12 times 34 is 380."), TokenCounter())
    assert done is not None and done.method == "extractive" and "380" not in done.summary


async def test_an_engine_summary_is_deduplicated_trimmed_and_fits_its_prompt_budget(
    data: DataDir, conv: Log
) -> None:
    for i in range(60):
        conv.user(f"question number {i} " + "about loops " * 20)
        conv.say(f"answer number {i}.")
    model = Scripted("The user asked about loops.\n\nThe user asked about loops.\n" + "x " * 500)
    count = TokenCounter()
    done = await summarize.update(data, CONV, model, count, max_words=40)
    assert done is not None and done.method == "engine"
    assert done.summary.count("The user asked about loops.") == 1
    assert len(done.summary.split()) <= 41  # the words, then an ellipsis
    assert count(model.prompts[0]) <= summarize.PROMPT_BUDGET
    assert "question number 59" in model.prompts[0]  # the newest turns survive the cut


async def test_chunks_said_again_after_a_broker_restart_count_once(
    data: DataDir, conv: Log
) -> None:
    conv.user("tell me about sets")
    done = conv.say("Sets ", "hold ", "unique items.")  # finished before the broker died
    cut = "s9"  # streaming when it died: seq 1 was lost with it
    conv.add("user.out", m.Chunk(stream=cut, seq=0, delta="They "), "narrator")
    conv.add("user.out", m.Chunk(stream=cut, seq=2, delta="fast."), "narrator")
    for seq, part in enumerate(("Sets ", "hold ", "unique items.")):  # said again
        again = m.Chunk(stream=done, seq=seq, delta=part, final=seq == 2, again=True)
        conv.add("user.out", again, "narrator")
    for seq, part in enumerate(("They ", "are ", "fast.")):
        conv.add("user.out", m.Chunk(stream=cut, seq=seq, delta=part, again=True), "narrator")
    conv.finish(cut, 3)
    new = summarize.collect(data.logs, CONV, summarize.read_sidecar(data, CONV))
    assert [t.text for t in new.turns] == [
        "tell me about sets",
        "Sets hold unique items.",
        "They are fast.",  # the lost chunk filled in, in its place
    ]
