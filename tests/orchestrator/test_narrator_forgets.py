"""The narrator forgets a quiet conversation (so serving conversation after conversation
does not grow it) and answers it afresh when it speaks again. A real broker and bus; no
engine (playbook cues need none)."""

from __future__ import annotations

import anyio

from engine.client import Client
from orchestrator.narrator import Narrator
from runtime import messages as m
from runtime.bus import Bus
from runtime.paths import DataDir
from tests.conftest import BrokerProcess

FORGET_S = 1.0


async def forgotten(narrator: Narrator) -> None:
    """Return once the narrator holds no conversation (polled: it signals nothing)."""
    with anyio.fail_after(FORGET_S + 5):
        while narrator.conversations:  # noqa: ASYNC110
            await anyio.sleep(0.1)


def cue(text: str) -> m.Cue:
    return m.Cue(
        speak_now=True,
        priority=1,
        reason="test",
        kind="playbook",
        playbook="engine_down",
        cover=[f"note: {text}"],
        closes_turn=True,
    )


async def test_quiet_conversations_are_forgotten_and_answered_again(
    data: DataDir, broker: BrokerProcess
) -> None:
    ep = data.read_endpoints()
    async with (
        Bus("narrator", ep, data.keys) as bus,
        Bus("controller", ep, data.keys) as controller,
        Bus("client", ep, data.keys) as user,
        Client("narrator", data.ipc("engine"), data.keys, timeout=2) as engine,
        anyio.create_task_group() as tg,
    ):
        narrator = Narrator(bus, data, engine, forget_s=FORGET_S)
        tg.start_soon(narrator.run)
        with user.subscribe("user.out") as shown:
            await anyio.sleep(0.3)  # subscriptions reach the broker

            async def answered(conversations: list[str]) -> None:
                ended: set[str] = set()
                with anyio.fail_after(20):
                    async for env in shown:
                        assert isinstance(env.body, m.Chunk)
                        if env.body.final:
                            ended.add(env.conversation or "")
                            if ended >= set(conversations):
                                return

            first = [f"c{i}" for i in range(20)]
            for name in first:
                await controller.publish("narrator.cue", cue(name), conversation=name)
            await answered(first)
            assert set(narrator.conversations) <= set(first)
            # quiet for longer than forget_s: every conversation is forgotten
            await forgotten(narrator)
            # a forgotten conversation speaks again: it is served afresh, then forgotten
            await controller.publish("narrator.cue", cue("again"), conversation="c3")
            await answered(["c3"])
            await forgotten(narrator)
        tg.cancel_scope.cancel()
