"""Backpressure: one slow or greedy party does not hold up the rest.

* a subscriber that never reads (a monitor socket, or a subscription inside a process)
  loses messages itself; the others get every message, about as fast as without it;
* a flood of ``user.in`` from one client does not stall another conversation, and every
  flooded turn is still acknowledged;
* a worker that never answers (SIGSTOPped, or one that sleeps through its tasks) costs
  its own turn a playbook message, not the other conversations their answers.

Real broker and real processes throughout; the tests with the real model are ``slow``.
Bounds are generous (the machines that run this are noisy): they check that things are
delivered and answered, not how fast.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import zmq

from agents.base import Agent, Task, TaskResult
from orchestrator.prompts import playbook
from runtime import messages as m
from runtime.bus import Bus
from runtime.embed import Connection, Runtime
from runtime.keys import curve_client
from runtime.paths import DataDir
from tests.conftest import BrokerProcess

ECHO = "agents.testing:EchoAgent"


class SilentAgent(Agent):
    """Accepts every task and never answers (its heartbeats go on): only the deadline
    ends its tasks. Run as ``--impl tests.test_backpressure:SilentAgent``."""

    async def on_task(self, task: Task) -> TaskResult:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def closed_turn(
    rt: Connection, text: str, conversation: str, timeout: float
) -> tuple[list[m.Chunk], float]:
    """Every chunk of one turn up to the one that closes it, and the seconds it took."""
    started = time.monotonic()
    chunks: list[m.Chunk] = []
    with anyio.fail_after(timeout):
        async for chunk in rt.chat(text, conversation=conversation):
            chunks.append(chunk)
    assert chunks and chunks[-1].final and chunks[-1].closes_turn, chunks
    return chunks, time.monotonic() - started


def said(chunks: list[m.Chunk]) -> str:
    return "".join(c.delta for c in chunks)


# -- a slow subscriber -----------------------------------------------------------------------


def never_reading_monitor(data: DataDir, ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
    """A monitor that subscribes to everything and never reads (a plain pyzmq socket, as
    any subscriber in another language would be), with a small receive queue."""
    endpoints = data.read_endpoints()
    sock: zmq.Socket[Any] = ctx.socket(zmq.SUB)
    curve_client(sock, data.keys, "monitor", endpoints.broker_public_key.encode())
    sock.setsockopt(zmq.RCVHWM, 100)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.linger = 0
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoints.sub)
    return sock


async def flood_events(data: DataDir, count: int) -> tuple[float, int, int]:
    """``count`` notes on ``event.coder``, paced by what the receiver has taken (so the
    publisher's own queue never overflows); the seconds until all arrived, how many
    arrived, and how many a never-read subscription in the receiver's process dropped."""
    endpoints = data.read_endpoints()
    async with (
        Bus("coder", endpoints, data.keys) as coder,
        Bus("controller", endpoints, data.keys) as controller,
    ):
        received = controller.subscribe("event.coder", buffer=count + 1000)
        stuck = controller.subscribe("event.", buffer=10)  # never read
        got = 0
        started = time.monotonic()
        with anyio.fail_after(120):
            for i in range(count):
                await coder.publish("event.coder", m.Note(name="flood", data={"i": i}))
                if i % 500 == 499:
                    while got < i - 2000:  # at most ~2,500 in flight
                        await received.receive()
                        got += 1
            while got < count:
                envelope = await received.receive()
                got += 1
                if isinstance(envelope.body, m.Note) and envelope.body.data["i"] == count - 1:
                    break
        seconds = time.monotonic() - started
        with anyio.move_on_after(1):  # anything still coming would be a duplicate
            while True:
                await received.receive()
                got += 1
        return seconds, got, stuck.dropped


async def test_a_subscriber_that_never_reads_does_not_slow_the_others(
    data: DataDir, broker: BrokerProcess
) -> None:
    count = 20_000
    baseline_s, got, _ = await flood_events(data, count)
    assert got == count
    ctx: zmq.Context[Any] = zmq.Context()
    slow = never_reading_monitor(data, ctx)
    try:
        await anyio.sleep(0.5)  # the CURVE handshake and the subscription reach the broker
        with_slow_s, got, dropped_in_process = await flood_events(data, count)
        assert got == count, f"the reading subscriber got {got} of {count}"
        assert dropped_in_process > 0  # the never-read subscription lost its own messages
        assert with_slow_s < 3 * baseline_s + 10, (baseline_s, with_slow_s)
        # the slow monitor overflowed: the broker dropped messages to it, and only to it
        slowest = 0
        while slow.poll(500):
            slow.recv_multipart()
            slowest += 1
        assert slowest < count, slowest
    finally:
        slow.close(linger=0)
        ctx.term()
    assert broker.proc is not None and broker.proc.poll() is None


async def test_a_bus_closed_from_a_cancelled_task_releases_its_sockets(
    data: DataDir, broker: BrokerProcess
) -> None:
    """A subscriber task cancelled mid-read (how an app stops a monitor it no longer
    wants) closes its sockets and context; left to the garbage collector they would
    hang the process in ``zmq_ctx_term``."""
    opened: list[Bus] = []
    reading = anyio.Event()

    async def watch() -> None:
        async with Bus("monitor", data.read_endpoints(), data.keys) as bus:
            opened.append(bus)
            reading.set()
            with bus.subscribe("") as everything:
                async for _ in everything:
                    pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with anyio.fail_after(10):
            await reading.wait()
        tg.cancel_scope.cancel()
    [bus] = opened
    assert bus._pub is not None and bus._pub.closed
    assert bus._sub is not None and bus._sub.closed
    assert bus._ctx.closed


# -- a flood of user turns -------------------------------------------------------------------


async def test_a_flood_of_user_turns_does_not_stall_another_conversation(tmp_path: Path) -> None:
    """1,000 turns over 100 conversations from one client, at once; a turn in another
    conversation is still answered within a bound, and every flooded turn is delivered.
    (No engine: the narrator answers with its engine-down notice, so the time measured is
    the bus, the controller and the narrator.)"""
    async with Runtime(tmp_path / "data", agents={}, engine=False) as rt:
        _, baseline_s = await closed_turn(rt, "hello!", "calm-before", timeout=60)
        async with rt.bus("client") as flooder:
            turns = [
                await flooder.publish(
                    "user.in", m.UserTurn(text="hi"), conversation=f"flood-{i % 100}"
                )
                for i in range(1000)
            ]
            chunks, flooded_s = await closed_turn(rt, "hello!", "calm", timeout=90)
            assert chunks[-1].closes_turn
            with anyio.fail_after(120):
                for turn in turns:
                    await flooder.delivered(turn.id)
            assert flooder.unacknowledged == 0
        # and the system is still fine after it
        await closed_turn(rt, "thanks!", "calm", timeout=60)
    print(f"calm turn: {baseline_s:.2f} s alone, {flooded_s:.2f} s under the flood")


# -- a worker that never answers -------------------------------------------------------------


async def wait_for_heartbeat(rt: Runtime, agent: str) -> None:
    with rt.subscribe(f"heartbeat.{agent}") as beats, anyio.fail_after(60):
        await anext(beats)


async def test_a_stopped_worker_costs_its_own_turn_a_notice_not_the_others_their_answers(
    tmp_path: Path,
) -> None:
    """The search agent is SIGSTOPped just before a question reaches it: that turn still
    closes (the agent_crashed notice, then the retry's answer or the task_failed one),
    and small talk in another conversation is answered meanwhile."""
    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents={"search": ECHO}, engine=False) as rt:
        assert rt.supervisor is not None
        await wait_for_heartbeat(rt, "search")
        proc = rt.supervisor.children["search"].process
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            results: dict[str, list[m.Chunk]] = {}

            async def ask(name: str, text: str, timeout: float) -> None:
                results[name], _ = await closed_turn(rt, text, name, timeout)

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, "stuck", "Where is the assert statement documented?", 120)
                await anyio.sleep(0.5)
                tg.start_soon(ask, "calm", "hello!", 60)
        finally:
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the supervisor killed it for missing its heartbeats
        stuck = results["stuck"]
        assert any(c.notice for c in stuck), said(stuck)
        assert playbook("agent_crashed") in said(stuck) or "couldn't finish" in said(stuck)
        assert results["calm"][-1].closes_turn
    from orchestrator.task_graph import TaskGraph

    states = {node.state for node in TaskGraph.at(data.root).nodes()}
    assert states <= {"succeeded", "failed", "cancelled"}, states  # nothing stuck running


# -- with the real model ---------------------------------------------------------------------


@pytest.fixture
def fast_rag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORUS_RAG_METHOD", "bm25")  # no MiniLM index to build


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_with_the_model_a_flood_into_one_conversation_leaves_another_its_answer(
    tmp_path: Path,
) -> None:
    """200 turns at once into one conversation: each new turn interrupts the one before,
    the last is answered, and another conversation's small talk gets a real answer."""
    async with Runtime(tmp_path / "data", agents={}) as rt:
        await closed_turn(rt, "hello!", "warm-up", timeout=300)
        _, baseline_s = await closed_turn(rt, "good morning!", "calm", timeout=300)
        async with rt.bus("client") as flooder:
            turns = [
                await flooder.publish("user.in", m.UserTurn(text=f"hi {i}"), conversation="flood")
                for i in range(199)
            ]
            last = rt.chat("thanks!", conversation="flood")
            chunks, flooded_s = await closed_turn(rt, "how are you?", "calm", timeout=300)
            assert chunks[-1].finish == "done" and said(chunks).strip(), said(chunks)
            with anyio.fail_after(300):
                async for chunk in last:
                    if chunk.final and chunk.closes_turn:
                        assert chunk.finish == "done"
                        break
                for turn in turns:
                    await flooder.delivered(turn.id)
    print(f"calm turn: {baseline_s:.2f} s alone, {flooded_s:.2f} s under the flood")


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_with_the_model_a_worker_that_never_answers_ends_in_a_playbook_message(
    tmp_path: Path, fast_rag: None
) -> None:
    """The search agent accepts tasks and never answers: the question ends with the
    task_failed playbook after the deadlines, and another conversation is answered by the
    model meanwhile."""
    data = DataDir(tmp_path / "data")
    agents = {"search": "tests.test_backpressure:SilentAgent", "coder": ECHO, "rag": ECHO}
    async with Runtime(data.root, agents=agents) as rt:
        await wait_for_heartbeat(rt, "search")
        results: dict[str, tuple[list[m.Chunk], float]] = {}

        async def ask(name: str, text: str, timeout: float) -> None:
            results[name] = await closed_turn(rt, text, name, timeout)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "stuck", "Where is the assert statement documented?", 400)
            await anyio.sleep(1)
            tg.start_soon(ask, "calm", "hello!", 300)
        stuck, stuck_s = results["stuck"]
        calm, calm_s = results["calm"]
        assert calm[-1].finish == "done" and said(calm).strip()
        assert calm_s < stuck_s  # the calm conversation did not wait for the silent worker
        assert "couldn't finish" in said(stuck) or "taking longer" in said(stuck), said(stuck)
        assert any(c.notice for c in stuck)
    from orchestrator.task_graph import TaskGraph

    [node] = TaskGraph.at(data.root).nodes()
    assert node.state == "failed" and node.attempts == 2, node
