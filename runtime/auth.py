"""CURVE authentication for the sockets Chorus binds (the broker's and the engine's).

A ZAP handler lets in only the public keys under ``data/keys`` of the identities a
server accepts, and tags each connection's messages with that identity as their
``User-Id`` frame property, which is what the broker's ACL and the engine check.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import zmq
import zmq.auth.thread
from zmq.utils import z85

from .keys import known_identities


class _KnownKeys:
    """ZAP credentials provider: only the accepted identities' keys are let in."""

    def __init__(self, table: dict[bytes, str]) -> None:
        self.by_z85 = table

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.by_z85


class Authenticator(zmq.auth.thread.ThreadAuthenticator):
    """Sets each connection's User-Id to the identity name tied to its public key."""

    def __init__(
        self, ctx: zmq.Context[Any], key_dir: Path, accept: Collection[str] | None = None
    ) -> None:
        super().__init__(ctx)
        table = {
            k: v for k, v in known_identities(key_dir).items() if accept is None or v in accept
        }
        self.known = _KnownKeys(table)

    def start(self) -> None:
        super().start()
        self.configure_curve_callback("*", credentials_provider=self.known)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.known.by_z85.get(z85.encode(client_public_key), "unknown")


def identity_of(frame: zmq.Frame) -> str:
    """The authenticated identity a received frame came from."""
    try:
        return str(frame.get("User-Id"))
    except zmq.ZMQError:
        return "unknown"
