"""``python -m orchestrator controller|narrator``: the two orchestrating processes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

from engine.client import Client
from runtime import logconfig
from runtime.bus import Bus
from runtime.errors import ChorusError
from runtime.paths import DataDir

from .process import until_signalled


async def serve(role: str, data: DataDir) -> None:
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

            worker = Controller(bus, data, engine).run
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator")
    parser.add_argument("role", choices=["controller", "narrator"])
    parser.add_argument("--data-dir", type=Path, default=None)
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
        data.wait_for_endpoints()
        anyio.run(serve, args.role, data)
    except ChorusError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
