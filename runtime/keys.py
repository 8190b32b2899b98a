"""CURVE keys: one keypair per identity under ``data/keys/`` (zmq.auth certificate files).

``<name>.key`` holds the public key, ``<name>.key_secret`` both keys (mode 0600).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from .acl import IDENTITIES
from .errors import ConfigError


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair (z85 bytes)."""

    name: str
    public: bytes
    secret: bytes


def ensure_keys(key_dir: Path, names: tuple[str, ...] = IDENTITIES) -> None:
    """Create any missing keypair; existing ones are kept (peers keep trusting them)."""
    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    for name in names:
        secret = key_dir / f"{name}.key_secret"
        if secret.exists():
            if secret.stat().st_mode & 0o077:
                os.chmod(secret, 0o600)  # a copied file may have lost its mode; it is a secret
            continue
        zmq.auth.create_certificates(str(key_dir), name)
        os.chmod(secret, 0o600)


def load_keypair(key_dir: Path, name: str) -> Keypair:
    """The keypair of ``name``; a missing or unreadable file is a ConfigError."""
    path = key_dir / f"{name}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"no usable key for {name!r} at {path} ({exc}); run `python -m runtime launch` "
            "once to create the keys, or copy them from the host that has them"
        ) from exc
    if secret is None:
        raise ConfigError(f"{path} holds no secret key; recreate it by deleting it")
    return Keypair(name, public, secret)


def load_public(key_dir: Path, name: str) -> bytes:
    """The public key of ``name``."""
    path = key_dir / f"{name}.key"
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no public key for {name!r} at {path} ({exc})") from exc
    return public


def known_identities(key_dir: Path) -> dict[bytes, str]:
    """Public key -> identity, for every identity Chorus knows and has a key for."""
    table: dict[bytes, str] = {}
    for name in IDENTITIES:
        path = key_dir / f"{name}.key"
        if path.exists():
            table[load_public(key_dir, name)] = name
    return table


def curve_client(sock: zmq.Socket[Any], key_dir: Path, name: str, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client speaking as ``name`` to a server with that key."""
    pair = load_keypair(key_dir, name)
    sock.curve_secretkey = pair.secret
    sock.curve_publickey = pair.public
    sock.curve_serverkey = server_public


def curve_server(sock: zmq.Socket[Any], key_dir: Path, name: str) -> None:
    """Make ``sock`` a CURVE server with the keypair of ``name``."""
    pair = load_keypair(key_dir, name)
    sock.curve_secretkey = pair.secret
    sock.curve_publickey = pair.public
    sock.curve_server = True
