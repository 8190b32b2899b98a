"""Embed Chorus in a Starlette app: the runtime starts and stops with the app.

    python examples/embed_in_app.py --data-dir data --port 8000
    curl localhost:8000/status
    curl -N 'localhost:8000/watch?prefix=heartbeat.'

The app owns a ``runtime.Runtime``: its lifespan starts every Chorus process (they stay
separate processes) and stops them when the server stops. ``/watch`` streams bus
envelopes as JSON lines; ``/ask`` sends a user turn and streams the narrator's answer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import runtime


def build_app(data_dir: str, *, engine: bool = True) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runtime.Runtime(data_dir, engine=engine) as rt:
            app.state.rt = rt
            yield

    async def status(request: Request) -> JSONResponse:
        rt: runtime.Runtime = request.app.state.rt
        assert rt.supervisor is not None
        children = {
            name: {
                "pid": child.process.pid if child.process else None,
                "restarts": len(child.restarts),
            }
            for name, child in rt.supervisor.children.items()
        }
        return JSONResponse({"data_dir": str(rt.data.root), "processes": children})

    async def watch(request: Request) -> StreamingResponse:
        rt: runtime.Runtime = request.app.state.rt
        prefix = request.query_params.get("prefix", "")

        async def lines() -> AsyncIterator[bytes]:
            with rt.subscribe(prefix) as envelopes:
                async for envelope in envelopes:
                    yield msgspec.json.encode(envelope) + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def ask(request: Request) -> StreamingResponse:
        rt: runtime.Runtime = request.app.state.rt
        text = request.query_params.get("q", "")

        async def answer() -> AsyncIterator[bytes]:
            async for chunk in rt.chat(text):
                yield chunk.delta.encode()

        return StreamingResponse(answer(), media_type="text/plain")

    return Starlette(
        routes=[Route("/status", status), Route("/watch", watch), Route("/ask", ask)],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=os.environ.get("CHORUS_DATA_DIR", "data"))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-engine", action="store_true", help="start without the model")
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.data_dir, engine=not args.no_engine), host="127.0.0.1", port=args.port
    )


if __name__ == "__main__":
    main()
