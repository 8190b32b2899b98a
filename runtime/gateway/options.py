"""The gateway's command-line options, shared by ``serve`` and ``launch --serve``.

Kept apart from the server so that building the CLI parser (every Chorus process
does) imports neither FastAPI nor uvicorn.
"""

from __future__ import annotations

import argparse

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8600
DEFAULT_RATE_LIMIT = "60/min"
DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_MAX_STREAMS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's options, shared by ``serve`` and ``launch --serve``. They default to
    None (unset): :mod:`runtime.settings` fills in CHORUS_* values, the env file, then
    the defaults named in the help (``DEFAULT_HOST``, ``DEFAULT_PORT``, …)."""
    parser.add_argument(
        "--host",
        help="address to listen on (default 127.0.0.1; anything else is reachable from other machines)",
    )
    parser.add_argument("--port", type=int, help="port (default 8600; 0 picks a free one)")
    parser.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="let pages from ORIGIN call the API (CORS; repeatable; default: none)",
    )
    parser.add_argument(
        "--rate-limit",
        metavar="N/min",
        help="POST /v1/chat requests per token (default 60/min; 0 turns it off)",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        metavar="BYTES",
        help="largest request body (default 65536)",
    )
    parser.add_argument(
        "--max-streams",
        type=int,
        metavar="N",
        help="open chat and event streams per token at once (default 32; the next gets 429)",
    )
