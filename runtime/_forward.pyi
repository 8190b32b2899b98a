"""The broker's forwarding loop in C (runtime/_forward.c), on pyzmq's sockets."""

from collections.abc import Callable
from typing import Any

def forward(
    source: int,
    sink: int,
    limit: int,
    decode: Callable[[bytes], Any],
    verdicts: dict[tuple[str, str, type], Any],
    log: list[Any],
    max_bytes: int,
    other: Callable[[str, list[bytes]], object],
) -> int:
    """Forward up to ``limit`` waiting messages whose checks are known to pass (their
    payloads appended to ``log``); hand every other to ``other``. How many it sent."""
