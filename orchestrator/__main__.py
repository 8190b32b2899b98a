"""``python -m orchestrator controller|narrator``: the two orchestrating processes;
``python -m orchestrator summarize [--conversation C]``: bring rolling summaries up to date
by hand (with the engine when one runs, extractive otherwise)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

from engine.client import Client
from runtime import logconfig
from runtime.bus import Bus
from runtime.errors import ChorusError
from runtime.lifeline import die_with_parent
from runtime.paths import DataDir

from .gating import GateConfig
from .process import until_signalled


async def serve(role: str, data: DataDir, gate: GateConfig) -> None:
    endpoints = data.read_endpoints()
    async with AsyncExitStack() as stack:
        bus = await stack.enter_async_context(Bus(role, endpoints, data.keys))
        engine = None
        if endpoints.engine is not None:
            engine = await stack.enter_async_context(
                Client(role, endpoints.engine, data.keys, timeout=60)
            )
        if role == "controller":
            from .controller import Controller
            from .gating import Gate

            worker = Controller(bus, data, engine, gate=Gate(time.monotonic, gate)).run
        else:
            from .narrator import Narrator

            if engine is None:
                # with no engine the narrator can still speak acks and playbooks
                engine = await stack.enter_async_context(
                    Client(role, data.ipc("engine"), data.keys, timeout=2)
                )
            worker = Narrator(bus, data, engine).run
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            await until_signalled()
            tg.cancel_scope.cancel()


async def summarize_now(data: DataDir, conversations: list[str]) -> None:
    from .log import summarize
    from .tokens import TokenCounter

    async with AsyncExitStack() as stack:
        engine: Client | None = None
        try:
            endpoint = data.read_endpoints().engine
        except FileNotFoundError:
            endpoint = None
        if endpoint is not None:
            engine = await stack.enter_async_context(
                Client("operator", endpoint, data.keys, timeout=30)
            )
            try:
                await engine.stats()
            except ChorusError as exc:
                print(f"engine not answering ({exc}): extractive summaries", file=sys.stderr)
                engine = None
        count = await TokenCounter.from_engine(engine)
        for conversation in conversations or summarize.conversations(data.logs):
            done = await summarize.update(data, conversation, engine, count)
            md, _ = summarize.paths(data, conversation)
            state = f"{done.method}, {done.turns} turns" if done else "already up to date"
            print(f"{conversation}: {state} -> {md}")


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m orchestrator")
    parser.add_argument("role", choices=["controller", "narrator", "summarize"])
    parser.add_argument(
        "--conversation", action="append", default=[], help="summarize: only these (repeatable)"
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    defaults = GateConfig()
    for flag, value, what in (
        ("--min-gap-s", defaults.min_gap_s, "seconds between two progress updates"),
        ("--idle-s", defaults.idle_s, "silence while tasks run before a progress update"),
        ("--coalesce-s", defaults.coalesce_s, "events this close are told together"),
    ):
        parser.add_argument(flag, type=float, default=value, help=f"controller: {what}")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--log-json", action="store_true")
    args = parser.parse_args(argv)
    data = DataDir.at(args.data_dir)
    logconfig.configure(
        args.role,
        log_dir=data.process_logs if args.log_json else None,
        debug=args.debug,
        console=False if args.log_json else None,
    )
    try:
        if args.role == "summarize":
            anyio.run(summarize_now, data, args.conversation)
            return 0
        data.wait_for_endpoints()
        gate = GateConfig(min_gap_s=args.min_gap_s, idle_s=args.idle_s, coalesce_s=args.coalesce_s)
        anyio.run(serve, args.role, data, gate)
    except ChorusError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
