"""The gateway's command-line options, shared by ``serve`` and ``launch --serve``.

Kept apart from the server so that building the CLI parser (every Chorus process
does) imports neither FastAPI nor uvicorn.
"""

from __future__ import annotations

import argparse

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's options, shared by ``serve`` and ``launch --serve``."""
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (default 127.0.0.1; anything else is reachable from other machines)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port (default 8600; 0 picks a free one)"
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages from ORIGIN call the API (CORS; repeatable; default: none)",
    )
    parser.add_argument(
        "--rate-limit",
        default="60/min",
        metavar="N/min",
        help="POST /v1/chat requests per token (default 60/min; 0 turns it off)",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        default=64 * 1024,
        metavar="BYTES",
        help="largest request body (default 65536)",
    )
