"""At-least-once delivery of work messages, across a late receiver and a broker restart."""

from __future__ import annotations

import anyio
import pytest

from runtime import messages as m
from runtime.bus import Bus
from runtime.embed import connect
from runtime.errors import MessageRejected
from runtime.paths import DataDir
from tests.conftest import BrokerProcess


async def receive_n(sub: object, n: int, timeout: float = 10) -> list[m.Envelope]:
    got: list[m.Envelope] = []
    with anyio.fail_after(timeout):
        async for env in sub:  # type: ignore[attr-defined]
            got.append(env)
            if len(got) == n:
                return got
    return got


async def test_reliable_message_is_acknowledged_once_received(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    async with Bus("controller", ep, data.keys) as ctl, Bus("coder", ep, data.keys) as coder:
        tasks = coder.subscribe("task.assign.coder")
        await anyio.sleep(0.3)
        sent = await ctl.publish("task.assign.coder", m.TaskAssign(task="t1", kind="k", text="x"))
        [got] = await receive_n(tasks, 1)
        assert got.id == sent.id
        with anyio.fail_after(5):
            await ctl.delivered(sent.id)
        assert ctl.unacknowledged == 0


async def test_late_receiver_still_gets_the_message_exactly_once(
    data: DataDir, broker: BrokerProcess
) -> None:
    """Published before anyone listens: pub/sub would drop it; the re-send does not."""
    ep = data.read_endpoints()
    async with Bus("controller", ep, data.keys) as ctl:
        sent = await ctl.publish("task.assign.rag", m.TaskAssign(task="t2", kind="k", text="late"))
        await anyio.sleep(1.0)
        assert ctl.unacknowledged == 1
        async with Bus("rag", ep, data.keys) as rag:
            tasks = rag.subscribe("task.assign.rag")
            [got] = await receive_n(tasks, 1)
            assert got.id == sent.id
            with anyio.fail_after(10):
                await ctl.delivered(sent.id)
            # re-sends already in flight are dropped as duplicates
            with anyio.move_on_after(1.0):
                async for dup in tasks:
                    raise AssertionError(f"duplicate delivered: {dup.id}")
        assert ctl.resent >= 1


async def test_best_effort_topics_are_not_resent(data: DataDir, broker: BrokerProcess) -> None:
    ep = data.read_endpoints()
    async with Bus("coder", ep, data.keys) as coder:
        await coder.publish("event.coder", m.Note(name="x"))
        assert coder.unacknowledged == 0


async def test_broker_restart_loses_no_work_and_everyone_reconnects(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    async with Bus("controller", ep, data.keys) as ctl, Bus("coder", ep, data.keys) as coder:
        tasks = coder.subscribe("task.assign.coder")
        await anyio.sleep(0.3)
        broker.kill()
        in_flight = [
            await ctl.publish("task.assign.coder", m.TaskAssign(task=f"t{i}", kind="k", text="x"))
            for i in range(3)
        ]
        await anyio.sleep(0.5)
        broker.start()
        got = await receive_n(tasks, 3, timeout=15)
        assert sorted(e.id for e in got) == sorted(e.id for e in in_flight)
        with anyio.fail_after(10):
            for env in in_flight:
                await ctl.delivered(env.id)
        # and ordinary traffic flows again, both ways
        events = ctl.subscribe("task.update")
        await anyio.sleep(0.3)
        await coder.publish("task.update", m.TaskUpdate(task="t0", state="accepted"))
        [update] = await receive_n(events, 1)
        assert update.sender == "coder"


async def test_a_message_over_the_brokers_limit_is_refused_before_it_is_sent(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    async with Bus("client", ep, data.keys) as client:
        with pytest.raises(MessageRejected, match="exceeds the broker's 1048576-byte limit"):
            await client.publish("user.in", m.UserTurn(text="x" * (2 << 20)))
        assert client.unacknowledged == 0  # nothing left to re-send


async def test_a_reliable_message_the_broker_refuses_is_not_resent(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    async with Bus("client", ep, data.keys) as client, Bus("monitor", ep, data.keys) as mon:
        rejected = mon.subscribe("sys.rejected")
        await anyio.sleep(0.3)
        wrong = m.Chunk(stream="s", seq=0, delta="not a user turn")
        sent = await client.publish("user.in", wrong)
        with anyio.fail_after(5), pytest.raises(MessageRejected, match=r"refused user\.in"):
            await client.delivered(sent.id)
        assert client.unacknowledged == 0
        await anyio.sleep(1.5)  # past several re-send intervals
        seen = []
        with anyio.move_on_after(0.5):
            async for env in rejected:
                seen.append(env)
        assert len(seen) == 1 and isinstance(seen[0].body, m.Rejected)
        assert seen[0].body.id == sent.id


async def test_chat_answers_a_turn_too_big_to_send_with_the_input_rejected_playbook(
    data: DataDir, broker: BrokerProcess
) -> None:
    async with connect(data.root) as rt, rt.bus("controller") as controller:
        turns = controller.subscribe("user.in")
        with anyio.fail_after(10):
            chunks = [c async for c in rt.chat("x" * (2 << 20), conversation="c1")]
        assert len(chunks) == 1 and chunks[0].notice and chunks[0].closes_turn
        assert chunks[0].delta.startswith("I couldn't accept that message:")
        assert "1048576-byte limit" in chunks[0].delta
        with anyio.move_on_after(0.5):
            async for env in turns:
                raise AssertionError(f"the oversized turn was sent: {env.id}")
