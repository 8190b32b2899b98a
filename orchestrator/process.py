"""What the controller and narrator processes share: the bus, heartbeats, signals."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable

import anyio
import psutil

from runtime import messages as m
from runtime.bus import Bus

HEARTBEAT_S = 1.0


async def heartbeat_loop(
    bus: Bus, name: str, state: Callable[[], tuple[str, str | None, int]]
) -> None:
    """``heartbeat.<name>`` every second: (state, current task, queue depth) from ``state``."""
    proc = psutil.Process()
    while True:
        current, task, depth = state()
        body = m.Heartbeat(
            state=current,  # type: ignore[arg-type]
            task=task,
            queue_depth=depth,
            load=proc.cpu_percent() / 100.0,
            pid=os.getpid(),
        )
        await bus.publish(f"heartbeat.{name}", body)
        await anyio.sleep(HEARTBEAT_S)


async def until_signalled(on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Return at SIGTERM or SIGINT (after running ``on_stop``)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            break
    if on_stop is not None:
        await on_stop()
