"""The user's seat in a terminal: ``launch`` opens a chat when stdin is a terminal, and
``launch --ask "question"`` prints one answer and exits.

The chat shows the narrator's stream as the conversation. Typing while it speaks
sends a new turn, which interrupts it. ``/rail`` toggles the activity rail (a status
line of agents, their heartbeats and running tasks); ``/quit``, Ctrl-C or EOF end it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import anyio

from . import messages as m
from .embed import Connection

ANSWER_TIMEOUT_S = 300.0


@dataclass
class Activity:
    """What the rail shows: each agent's last heartbeat and the tasks being worked on."""

    agents: dict[str, tuple[float, m.Heartbeat]] = field(default_factory=dict)
    tasks: dict[str, tuple[float, str]] = field(default_factory=dict)  # task -> (since, state)

    def line(self) -> str:
        now = time.time()
        agents = " · ".join(
            f"{name} {beat.state}{'(' + beat.task[:10] + ')' if beat.task else ''}"
            + (" ⚠ silent" if now - seen > 5 else "")
            for name, (seen, beat) in sorted(self.agents.items())
        )
        running = ", ".join(
            f"{task[:14]} {state} {now - since:.0f}s" for task, (since, state) in self.tasks.items()
        )
        return f"[agents: {agents or 'none yet'}]" + (f" [tasks: {running}]" if running else "")


async def watch_activity(conn: Connection, activity: Activity) -> None:
    with conn.subscribe("heartbeat.") as beats, conn.subscribe("task.update") as updates:
        async with anyio.create_task_group() as tg:

            async def heartbeats() -> None:
                async for env in beats:
                    if isinstance(env.body, m.Heartbeat):
                        activity.agents[env.sender] = (time.time(), env.body)

            async def tasks() -> None:
                async for env in updates:
                    body = env.body
                    if not isinstance(body, m.TaskUpdate):
                        continue
                    if body.state in ("result", "failed", "cancelled"):
                        activity.tasks.pop(body.task, None)
                    else:
                        since = activity.tasks.get(body.task, (time.time(), ""))[0]
                        activity.tasks[body.task] = (since, body.state)

            tg.start_soon(heartbeats)
            tg.start_soon(tasks)


async def ask(conn: Connection, text: str, out: TextIO = sys.stdout) -> int:
    """Print the narrator's answer to one turn; 0 when it answered, 1 otherwise."""
    finish = ""
    with anyio.move_on_after(ANSWER_TIMEOUT_S):
        async for chunk in conn.chat(text):
            out.write(chunk.delta)
            out.flush()
            if chunk.final:
                finish = chunk.finish
        out.write("\n")
        if finish == "done":
            return 0
        print(
            f"error: the system could not answer (the answer ended with {finish or 'nothing'})",
            file=sys.stderr,
        )
        return 1
    print(f"error: no answer within {ANSWER_TIMEOUT_S:g} s", file=sys.stderr)
    return 1


async def terminal_chat(conn: Connection) -> None:
    """Read turns from stdin until /quit or EOF; print the narrator's stream as it comes."""
    conversation = m.new_id()
    activity = Activity()
    show_rail = True
    print(
        "Chat with Chorus. Type to talk (typing while it speaks interrupts), /rail toggles the activity rail, /quit ends."
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_activity, conn, activity)
        tg.start_soon(_print_stream, conn, conversation)
        while True:
            if show_rail:
                print(activity.line(), flush=True)
            try:
                text = await anyio.to_thread.run_sync(input, "you> ", abandon_on_cancel=True)
            except EOFError:
                break
            command = text.strip()
            if command in ("/quit", "/exit"):
                break
            if command == "/rail":
                show_rail = not show_rail
                continue
            if command:
                await conn.publish("user.in", m.UserTurn(text=text), conversation=conversation)
        tg.cancel_scope.cancel()


async def _print_stream(conn: Connection, conversation: str) -> None:
    with conn.subscribe("user.out") as out:
        async for env in out:
            chunk = env.body
            if env.conversation != conversation or not isinstance(chunk, m.Chunk):
                continue
            if chunk.seq == 0:
                print("\nchorus> ", end="")
            text = f"[{chunk.delta.strip()}]\n" if chunk.notice else chunk.delta
            print(text, end="", flush=True)
            if chunk.final:
                print(" [interrupted]" if chunk.finish == "interrupted" else "", flush=True)
