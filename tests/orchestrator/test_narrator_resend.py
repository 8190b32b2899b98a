"""A broker killed mid-answer loses the chunk it held; the narrator says its last chunks
again once the restarted broker is ready, so a reader (runtime.ordering) can fill the
gap. A real instance: broker, controller, narrator, an echo agent, no engine (the
narrator speaks the engine_down playbook line)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio

from runtime import messages as m
from runtime.embed import Runtime
from tests.runtime.test_supervisor import ECHO, child_pid


async def test_the_narrator_says_its_last_chunks_again_after_a_broker_restart(
    tmp_path: Path,
) -> None:
    async with Runtime(tmp_path / "data", agents=ECHO, engine=False) as rt:
        with anyio.fail_after(60):
            said = [chunk async for chunk in rt.chat("Hello, who are you?")]
            assert said and said[-1].closes_turn
            with rt.subscribe("user.out") as out:
                os.kill(child_pid(rt, "broker"), signal.SIGKILL)
                again: list[m.Chunk] = []
                async for envelope in out:
                    assert isinstance(envelope.body, m.Chunk)
                    again.append(envelope.body)
                    if len(again) == len(said):
                        break
    assert [(c.stream, c.seq, c.delta) for c in again] == [(c.stream, c.seq, c.delta) for c in said]
    assert all(c.again for c in again) and not any(c.again for c in said)
