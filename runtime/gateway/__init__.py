"""The HTTP gateway: ``python -m runtime serve`` (or ``launch --serve``).

FastAPI + uvicorn in front of one Chorus instance: chat with the narrator as
Server-Sent Events, the agents, tasks, logs and decisions as JSON, an activity feed,
Prometheus metrics, and the web chat page. See ``docs/http-api.md``.

The public names load on first use, so importing ``runtime.gateway.options`` (the CLI
does, in every process) does not import FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import GatewayConfig as GatewayConfig
    from .app import create_app as create_app
    from .auth import load_or_create_token as load_or_create_token
    from .server import GatewayServer as GatewayServer

__all__ = ["GatewayConfig", "GatewayServer", "create_app", "load_or_create_token"]

_WHERE = {
    "GatewayConfig": ".app",
    "create_app": ".app",
    "load_or_create_token": ".auth",
    "GatewayServer": ".server",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
