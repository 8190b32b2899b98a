"""CURVE on every socket Chorus binds, and unknown keys refused at the handshake.

Each check reads the outcome of the handshake itself from the client's socket monitor
(succeeded, refused by the ZAP handler, failed), so a refusal is an event seen, not a
message that failed to arrive within some time."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from engine.server import EngineServer
from runtime.acl import ENGINE_CALLERS, IDENTITIES
from runtime.errors import ConfigError
from runtime.keys import ensure_keys, load_keypair, load_public
from runtime.paths import DataDir
from tests.conftest import BrokerProcess

from .conftest import Handshake, handshake

NOBODY = 65534


def bound_sockets(data: DataDir) -> dict[str, tuple[int, str, bytes]]:
    """Every CURVE socket an instance binds: (client socket type, endpoint, server key)."""
    ep = data.read_endpoints()
    broker_key = ep.broker_public_key.encode()
    return {
        "bus publishers (XSUB)": (zmq.PUB, ep.pub, broker_key),
        "bus subscribers (XPUB)": (zmq.SUB, ep.sub, broker_key),
        "engine (ROUTER)": (zmq.DEALER, data.ipc("engine"), load_public(data.keys, "engine")),
    }


def as_identity(data: DataDir, name: str, kind: int, endpoint: str, server: bytes) -> Handshake:
    pair = load_keypair(data.keys, name)
    return handshake(kind, endpoint, server_key=server, public=pair.public, secret=pair.secret)


def test_a_known_key_completes_every_handshake(
    data: DataDir, broker: BrokerProcess, engine: EngineServer
) -> None:
    """The control for the refusals below: the probe does see a handshake succeed."""
    for name, (kind, endpoint, server) in bound_sockets(data).items():
        assert as_identity(data, "coder", kind, endpoint, server).outcome == "succeeded", name


def test_a_peer_without_curve_fails_the_handshake_on_every_socket(
    data: DataDir, broker: BrokerProcess, engine: EngineServer
) -> None:
    for name, (kind, endpoint, _) in bound_sockets(data).items():
        assert handshake(kind, endpoint, server_key=None).outcome == "failed", name


def test_a_strangers_key_is_refused_at_every_handshake(
    data: DataDir, broker: BrokerProcess, engine: EngineServer
) -> None:
    public, secret = zmq.curve_keypair()
    for name, (kind, endpoint, server) in bound_sockets(data).items():
        result = handshake(kind, endpoint, server_key=server, public=public, secret=secret)
        assert result == Handshake("refused", 400), name  # ZAP status 400: not a known key


def test_the_engine_admits_only_its_callers_and_the_bus_every_identity(
    data: DataDir, broker: BrokerProcess, engine: EngineServer
) -> None:
    sockets = bound_sockets(data)
    _, engine_ep, engine_key = sockets["engine (ROUTER)"]
    _, sub_ep, broker_key = sockets["bus subscribers (XPUB)"]
    for name in IDENTITIES:
        expected = "succeeded" if name in ENGINE_CALLERS else "refused"
        assert as_identity(data, name, zmq.DEALER, engine_ep, engine_key).outcome == expected
        assert as_identity(data, name, zmq.SUB, sub_ep, broker_key).outcome == "succeeded"


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A directory every user may pass through, unlike pytest's own temp folders (0700),
    so that only the data directory's own modes stand between a user and its files."""
    parent = Path(tempfile.mkdtemp(prefix="chorus-security-"))
    parent.chmod(0o755)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


def connect_as(uid: int, path: str) -> int:
    """errno of connecting to the unix socket ``path`` as ``uid`` (0: it connected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a threaded process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only makes system calls, then exits
        code = 0
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
        except OSError as exc:
            code = exc.errno or 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try the socket as another user")
def test_the_log_writers_plain_socket_is_out_of_other_users_reach(open_parent: Path) -> None:
    """The broker hands envelopes to its log writer over a PAIR socket on ipc without
    CURVE: the socket's folder (``data/run``, mode 0700) is what keeps others out. The
    broker runs with umask 0 here, so the socket file itself is open to all."""
    data = DataDir(open_parent / "data")
    data.ensure()
    ensure_keys(data.keys)
    broker = BrokerProcess(data)
    old = os.umask(0)
    try:
        broker.start()
    finally:
        os.umask(old)
    try:
        log_sock = data.ipc("log").removeprefix("ipc://")
        folder = Path(log_sock).parent
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert folder.stat().st_uid == os.getuid()
        assert stat.S_IMODE(os.stat(log_sock).st_mode) & 0o002  # umask 0: the file is open
        assert connect_as(NOBODY, log_sock) == errno.EACCES
        assert connect_as(os.getuid(), log_sock) != errno.EACCES  # the owner gets through
    finally:
        assert broker.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder of another user's")
def test_the_short_socket_folder_must_be_this_users(open_parent: Path) -> None:
    """Deep data directories put their sockets in ``/tmp/chorus-<hash>``, a predictable
    name: a folder another user made there first is refused, a loose one of ours tightened."""
    deep = DataDir(open_parent / ("x" * 60) / ("y" * 60))
    digest = hashlib.sha1(str(deep.root.resolve()).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"chorus-{digest}"
    short.mkdir(mode=0o777)
    try:
        short.chmod(0o777)
        os.chown(short, NOBODY, NOBODY)
        with pytest.raises(ConfigError, match="not a directory of this user's"):
            deep.socket_dir()
        os.chown(short, os.getuid(), os.getgid())
        assert deep.socket_dir() == short
        assert stat.S_IMODE(short.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(short, ignore_errors=True)
