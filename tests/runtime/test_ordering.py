"""Each narrator stream's chunks in seq order and once each (runtime.ordering), and the
same through Connection.chat on a real bus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from runtime import messages as m
from runtime import ordering
from runtime.embed import Runtime
from runtime.ordering import InOrder


def _c(seq: int, stream: str = "s", **end: Any) -> m.Chunk:
    return m.Chunk(stream=stream, seq=seq, delta=f"<{seq}>", **end)


def _seqs(chunks: list[m.Chunk]) -> list[int]:
    return [c.seq for c in chunks]


def test_copies_are_dropped_and_a_gap_holds_what_comes_after_it_until_filled() -> None:
    order = InOrder(gap_wait_s=5)
    assert _seqs(order.offer(_c(0), now=0)) == [0]
    assert order.offer(_c(0), now=0) == []  # a copy
    assert order.offer(_c(2), now=1) == [] and order.offer(_c(3), now=1) == []
    assert order.wait_s(now=2) == 4  # the gap opened at 1
    assert order.offer(_c(3), now=2) == []  # a copy of one held
    assert _seqs(order.offer(_c(1), now=3)) == [1, 2, 3]  # the gap filled
    assert order.wait_s(now=3) is None
    assert _seqs(order.offer(_c(0, stream="t"), now=3)) == [0]  # streams are apart


def test_a_gap_never_filled_is_given_up_on_after_the_wait() -> None:
    order = InOrder(gap_wait_s=5)
    order.offer(_c(0), now=0)
    assert order.offer(_c(2), now=1) == [] and order.offer(_c(4), now=2) == []
    assert order.expire(now=5.9) == []
    assert _seqs(order.expire(now=6)) == [2, 4]  # every gap of the stream skipped
    assert order.offer(_c(1), now=7) == [] and order.offer(_c(3), now=7) == []  # too late
    assert _seqs(order.offer(_c(5), now=7)) == [5]


async def test_chat_gives_each_chunk_once_in_order_across_copies_and_gaps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ordering, "GAP_WAIT_S", 1.0)
    async with Runtime(tmp_path / "data", agents={}, engine=False, orchestration=False) as rt:
        async with rt.bus("controller") as controller, rt.bus("narrator") as narrator:
            turns = controller.subscribe("user.in")
            got: list[m.Chunk] = []

            async def ask() -> None:
                async for chunk in rt.chat("tell me"):
                    got.append(chunk)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(ask)
                    turn = await turns.receive()

                    async def say(seq: int, stream: str = "a", **end: Any) -> None:
                        chunk = m.Chunk(
                            stream=stream, seq=seq, delta=f"<{seq}>", turn=turn.id, **end
                        )
                        await narrator.publish("user.out", chunk, conversation=turn.conversation)

                    # as after a broker restart: a late chunk, then the last ones said again
                    for seq in (0, 2, 3, 1, 2, 3):
                        await say(seq)
                    # a chunk lost for good: the rest comes after the wait
                    await say(5, final=True, finish="done", closes_turn=True)
    assert [(c.stream, c.seq) for c in got] == [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("a", 5)]
