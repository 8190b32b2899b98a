"""The broker's socket calls in C (runtime/_forward.c), on pyzmq's sockets."""

from typing_extensions import Buffer

def receive(socket: int, limit: int) -> list[tuple[str, list[bytes]]]:
    """Up to ``limit`` whole waiting messages, without blocking: (User-Id, frames)."""

def send(socket: int, topic: Buffer, payload: Buffer) -> None:
    """Send ``[topic, payload]`` without blocking (OSError where it would)."""
