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
    assert _seqs(order.expire(now=6)) == [2]  # 2 waited 5 s; 3 has been missing since 4 came
    assert order.wait_s(now=6) == 1
    assert order.offer(_c(1), now=6.5) == []  # too late
    assert _seqs(order.expire(now=7)) == [4]
    assert order.offer(_c(3), now=7) == []  # too late
    assert _seqs(order.offer(_c(5), now=7)) == [5]
    assert order.wait_s(now=7) is None


def test_a_later_gap_waits_from_when_it_was_seen_not_from_an_earlier_one() -> None:
    order = InOrder(gap_wait_s=5)
    assert order.offer(_c(1), now=0) == []  # 0 missing since 0
    assert order.offer(_c(3), now=4) == []  # 2 missing since 4
    assert _seqs(order.offer(_c(0), now=4.5)) == [0, 1]  # the first gap filled
    assert order.wait_s(now=4.5) == 4.5
    assert order.expire(now=8.9) == []
    assert _seqs(order.offer(_c(2), now=8.9)) == [2, 3]  # in time for its own wait


def test_chunks_held_long_enough_go_on_across_several_gaps() -> None:
    order = InOrder(gap_wait_s=5)
    assert order.offer(_c(4), now=0) == [] and order.offer(_c(2), now=3) == []
    # 4 has waited 5 s: the gaps before it go (0-1, then 3), and both held chunks with them
    assert _seqs(order.expire(now=5)) == [2, 4]


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


def test_a_reader_resumed_mid_stream_gets_what_follows_only() -> None:
    order = InOrder(gap_wait_s=5)
    order.resume("s", 2)  # it had 0, 1 and 2
    assert order.offer(_c(1), now=0) == [] and order.offer(_c(2), now=0) == []
    assert _seqs(order.offer(_c(3), now=0)) == [3]
    assert _seqs(order.offer(_c(0, stream="t"), now=0)) == [0]  # other streams from 0
