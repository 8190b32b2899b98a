"""Controller and narrator as real processes with real workers (echo agents, no model):
a turn becomes tasks, results become a cue, and only the narrator speaks."""

from __future__ import annotations

import time
from pathlib import Path

import anyio

from orchestrator.log.layout import hour_file_name
from orchestrator.task_graph import TaskGraph
from runtime import messages as m
from runtime.embed import Runtime
from runtime.paths import DataDir

ECHOES = {name: "agents.testing:EchoAgent" for name in ("coder", "search", "rag")}


async def collect_streams(
    rt: Runtime, out: object, conversation: str, streams: int
) -> list[list[m.Envelope]]:
    """Chunks of ``conversation`` grouped by stream, until ``streams`` streams ended."""
    by_stream: dict[str, list[m.Envelope]] = {}
    ended = 0
    with anyio.fail_after(60):
        async for env in out:  # type: ignore[attr-defined]
            if env.conversation != conversation:
                continue
            assert isinstance(env.body, m.Chunk)
            by_stream.setdefault(env.body.stream, []).append(env)
            if env.body.final:
                ended += 1
                if ended == streams:
                    return list(by_stream.values())
    raise AssertionError("stream ended early")


async def test_a_documentation_question_reaches_workers_and_only_the_narrator_speaks(
    tmp_path: Path,
) -> None:
    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents=ECHOES, engine=False) as rt:
        with anyio.fail_after(60):
            for name in ("controller", "narrator", "search", "rag"):
                with rt.subscribe(f"heartbeat.{name}") as beats:
                    await anext(beats)
        out = rt.subscribe("user.out")
        assigned = rt.subscribe("task.assign.")
        decisions = rt.subscribe("narrator.decision")
        await rt.publish(
            "user.in",
            m.UserTurn(text="Explain the for statement and where it is documented."),
            conversation="c1",
        )
        ack, result = await collect_streams(rt, out, "c1", 2)
        # the acknowledgement is templated, immediate, and names the agents asked
        ack_text = "".join(e.body.delta for e in ack)  # type: ignore[union-attr]
        assert "search agent" in ack_text and "documentation reader" in ack_text
        assert all(e.sender == "narrator" for e in ack + result)
        assert [e.body.seq for e in result] == list(range(len(result)))  # type: ignore[union-attr]
        # no engine in this run: the result cue ends with the engine-down playbook
        last = result[-1].body
        assert isinstance(last, m.Chunk) and last.final and last.finish == "error"
        assert any(e.body.notice for e in result)  # type: ignore[union-attr]
        # ... and still the agents' notes, as they are: the result reaches the user
        result_text = "".join(e.body.delta for e in result)  # type: ignore[union-attr]
        assert "Here is what came back:" in result_text, result_text
        agents = set()
        with anyio.fail_after(5):
            async for env in assigned:
                agents.add(env.topic.removeprefix("task.assign."))
                if len(agents) == 2:
                    break
        assert agents == {"search", "rag"}
        actions = []
        with anyio.move_on_after(1):
            async for env in decisions:
                actions.append(env.body.action)  # type: ignore[union-attr]
        assert "spoken" in actions and "finished" in actions
    nodes = TaskGraph.at(data.root).nodes()
    assert sorted(n.agent or "" for n in nodes) == ["rag", "search"]
    assert all(n.state == "succeeded" for n in nodes)


async def test_small_talk_needs_no_task(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents={}, engine=False) as rt:
        with anyio.fail_after(60), rt.subscribe("heartbeat.narrator") as beats:
            await anext(beats)
        out = rt.subscribe("user.out")
        assigned = rt.subscribe("task.assign.")
        await rt.publish("user.in", m.UserTurn(text="hello!"), conversation="c2")
        [answer] = await collect_streams(rt, out, "c2", 1)
        assert answer[-1].body.final  # type: ignore[union-attr]
        with anyio.move_on_after(0.5):
            async for env in assigned:
                raise AssertionError(f"small talk made a task: {env.topic}")
    assert TaskGraph.at(data.root).nodes() == []


async def test_a_full_disk_is_reported_the_user_is_told_and_serving_goes_on(
    tmp_path: Path,
) -> None:
    data = DataDir(tmp_path / "data")
    data.logs.mkdir(parents=True)
    now = time.time()
    for ts in (now, now + 3600):  # this hour's log file and the next one are full disks
        (data.logs / hour_file_name(ts)).symlink_to("/dev/full")
    async with Runtime(data.root, agents=ECHOES, engine=False) as rt:
        with anyio.fail_after(60):
            for name in ("controller", "narrator"):
                with rt.subscribe(f"heartbeat.{name}") as beats:
                    await anext(beats)
        # the broker's writer fails on its first flush; every conversation that starts
        # is answered, then told that its record may be incomplete
        for conversation in ("c1", "c2"):
            with rt.subscribe("user.out") as out:
                with anyio.fail_after(30):
                    said = [c.delta async for c in rt.chat("hello", conversation=conversation)]
                # answered (no engine here: with its playbook line) ...
                assert any("language model is restarting" in s for s in said), said
                # ... and the storage notice follows on the same conversation
                with anyio.fail_after(10):
                    async for env in out:
                        body = env.body
                        if isinstance(body, m.Chunk) and body.notice and "storage" in body.delta:
                            assert env.conversation == conversation and env.sender == "narrator"
                            assert "No space left on device" in body.delta, body.delta
                            break
