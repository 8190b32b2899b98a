"""A controller that dies between acknowledging a user turn and routing it loses nothing:
the next one finds the turn in the bus log and handles it once; the cues the narrator
never finished outlive the controller too. A real broker (and its log writer) and real
buses; the old controller is a bare ``controller`` bus, which acknowledges what it
receives and does nothing else, as a controller killed at that moment would."""

from __future__ import annotations

import anyio

from orchestrator import recovery
from orchestrator.controller import Controller
from orchestrator.log.query import LogQuery, query_envelopes
from runtime import messages as m
from runtime.bus import Bus, Subscription
from runtime.paths import DataDir
from tests.conftest import BrokerProcess


async def logged(data: DataDir, ids: set[str]) -> None:
    """Until the bus log holds every envelope id in ``ids`` (the writer batches)."""
    with anyio.fail_after(10):
        while True:
            found = recovery.find(
                query_envelopes(data.logs, LogQuery(topics=recovery.TOPICS)),
                set(),
            )
            seen = {e.id for e in found.turns} | set(found.unfinished)
            if ids <= seen:
                return
            await anyio.sleep(0.1)


async def next_cue(cues: Subscription, conversation: str, skip: str = "") -> m.Envelope:
    """The next cue in ``conversation`` but the one with id ``skip``."""
    with anyio.fail_after(10):
        async for env in cues:
            if env.conversation == conversation and isinstance(env.body, m.Cue):
                if env.id != skip:
                    return env
    raise AssertionError("the cue subscription ended")


async def test_a_turn_acknowledged_but_never_routed_is_handled_by_the_next_controller(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    async with Bus("client", ep, data.keys) as user, Bus("narrator", ep, data.keys) as narrator:
        with narrator.subscribe("narrator.cue") as cues:
            async with Bus("controller", ep, data.keys) as dying:
                # it acknowledges user.in on arrival (the bus does), then dies
                with dying.subscribe("user.in"):
                    turn = await user.publish(
                        "user.in", m.UserTurn(text="hello!"), conversation="c1"
                    )
                    with anyio.fail_after(10):
                        await user.delivered(turn.id)
            await logged(data, {turn.id})
            async with Bus("controller", ep, data.keys) as bus, anyio.create_task_group() as tg:
                controller = Controller(bus, data, engine=None)
                tg.start_soon(controller.run)
                cue = await next_cue(cues, "c1")
                assert isinstance(cue.body, m.Cue)
                assert cue.body.turn == turn.id and cue.body.kind == "answer"
                assert cue.body.user_text == "hello!"
                # handled once: the same turn again (a client's re-send) is not routed twice
                await user.send(turn)
                with anyio.move_on_after(1.5):
                    async for env in cues:
                        assert not (isinstance(env.body, m.Cue) and env.body.turn == turn.id)
                tg.cancel_scope.cancel()


async def test_cues_the_narrator_never_finished_are_said_again_after_both_restart(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    cue = m.Cue(speak_now=True, priority=1, reason="result", kind="result", cover=["42"])
    done = m.Cue(speak_now=True, priority=1, reason="result", kind="result", cover=["done"])
    async with Bus("narrator", ep, data.keys) as narrator:
        with narrator.subscribe("narrator.cue") as cues:
            async with Bus("controller", ep, data.keys) as dying:
                sent = await dying.publish("narrator.cue", cue, conversation="c2")
                said = await dying.publish("narrator.cue", done, conversation="c3")
                with anyio.fail_after(10):
                    await dying.delivered(sent.id)
                    await dying.delivered(said.id)
            finished = m.Decision(action="finished", reason="done", cue=said.id)
            await narrator.publish("narrator.decision", finished, conversation="c3")
            await logged(data, {sent.id})
            async with (
                Bus("controller", ep, data.keys) as bus,
                Bus("supervisor", ep, data.keys) as supervisor,
                anyio.create_task_group() as tg,
            ):
                controller = Controller(bus, data, engine=None)
                tg.start_soon(controller.run)
                with anyio.fail_after(10):
                    while sent.id not in controller.unfinished:  # noqa: ASYNC110
                        await anyio.sleep(0.1)
                assert said.id not in controller.unfinished  # the narrator finished that one
                await supervisor.publish(
                    "sys.restart", m.ProcessEvent(process="narrator", reason="exited")
                )
                again = await next_cue(cues, "c2", skip=sent.id)  # the first time
                assert isinstance(again.body, m.Cue)
                assert again.body.cover == ["42"] and again.body.playbook == "narrator_restarted"
                tg.cancel_scope.cancel()


def test_redacted_turns_are_recognised_and_a_later_turn_drops_older_cues() -> None:
    assert recovery.redacted("<redacted sha256:0123456789abcdef len=6>")
    assert not recovery.redacted("hello <redacted")

    def env(topic: str, body: m.Body, sender: str, n: int) -> m.Envelope:
        return m.Envelope(
            id=f"e{n}",
            topic=topic,
            sender=sender,
            ts=float(n),
            seq=n,
            body=body,  # type: ignore[arg-type]
            conversation="c",
        )

    cue = m.Cue(speak_now=True, priority=1, reason="r", kind="progress")
    found = recovery.find(
        [
            env("narrator.cue", cue, "controller", 1),
            env("user.in", m.UserTurn(text="next"), "client", 2),  # drops the queued cue
            env("user.in", m.UserTurn(text="routed"), "client", 3),
        ],
        served={"e3"},  # a task was made for it
    )
    assert found.unfinished == {}
    assert [e.id for e in found.turns] == ["e2"]
