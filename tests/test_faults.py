"""Fault injection on the whole product (slow: the real model and every real process).

A small run of the harness in ``benchmarks/faults.py``: ``runtime launch`` in a temp data
dir with two conversations of small talk going on through ``runtime.connect``, the broker
and then the narrator killed with SIGKILL while a turn is mid-stream. Every user turn must still end in an answer or an explicit
notice, and no task may be left unfinished in the task graph.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


async def test_broker_and_narrator_killed_mid_turn_lose_no_turn(tmp_path: Path) -> None:
    result = await faults.run(
        tmp_path / "data",
        [("broker", "kill9"), ("narrator", "kill9")],
        window_s=15.0,
        gateway=False,
        work=False,  # small talk only: an open turn is one the narrator is speaking
    )
    assert result["lost_turns"] == 0, result["lost"]
    assert result["stuck_tasks"] == []
    for fault in result["faults"]:
        assert fault["in_flight"], fault  # the kill landed on a turn being answered
        assert fault["detect_s"] is not None, fault
        assert fault["recover_s"] is not None, fault  # a later turn was answered again
        assert fault["answered"] + fault["playbook"] > 0, fault
    # what the killed narrator was saying is said again by the new one, after a notice
    [narrator] = [f for f in result["faults"] if f["process"] == "narrator"]
    assert narrator["playbook"] >= 1, narrator
    assert narrator["playbook_lines"] == ["Sorry, I was cut off; here it is again."], narrator
