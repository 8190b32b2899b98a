"""A Chorus instance for the gateway tests, in a process of its own: echo agents for
coder, search and rag, the real controller and narrator, no engine (so the narrator
answers with the engine-down notice at once). Prints ``ready`` and runs until SIGTERM."""

from __future__ import annotations

import signal
import sys

import anyio

from runtime.embed import Runtime

ECHOES = {name: "agents.testing:EchoAgent" for name in ("coder", "search", "rag")}


async def main(root: str) -> None:
    async with Runtime(root, agents=ECHOES, engine=False):
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            print("ready", flush=True)
            async for _ in signals:
                break


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
