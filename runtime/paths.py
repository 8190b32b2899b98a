"""Where a Chorus instance keeps its files (see DESIGN.md "Data")."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog

from .errors import ConfigError, NotRunning

log = structlog.get_logger("paths")

# sun_path is 108 bytes on Linux (104 on macOS), including the trailing NUL
IPC_PATH_LIMIT = 103


class Endpoints(msgspec.Struct, frozen=True):
    """The contents of ``data/run/endpoints.json``: all a peer needs to connect."""

    pub: str  # the broker's XSUB side: publishers connect here
    sub: str  # the broker's XPUB side: subscribers connect here
    engine: str | None
    broker_public_key: str
    max_bytes: int = 1 << 20  # the broker drops bigger payloads


def default_data_dir() -> Path:
    return Path(os.environ.get("CHORUS_DATA_DIR", "data"))


@dataclass(frozen=True)
class DataDir:
    """The data directory and the fixed places inside it."""

    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str] | None = None) -> DataDir:
        return cls(Path(path) if path is not None else default_data_dir())

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def process_logs(self) -> Path:
        return self.root / "logs" / "process"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def summaries(self) -> Path:
        return self.root / "summaries"

    @property
    def endpoints_file(self) -> Path:
        return self.run / "endpoints.json"

    @property
    def task_graph(self) -> Path:
        return self.root / "tasks.graph.json"

    def ensure(self) -> None:
        for d in (self.logs, self.process_logs, self.keys, self.run, self.summaries):
            d.mkdir(parents=True, exist_ok=True)
        # owner only: keys; the sockets (the log writer's is not CURVE); what users said
        for d in (self.keys, self.run, self.logs, self.summaries):
            os.chmod(d, 0o700)

    def socket_dir(self) -> Path:
        """Where ``ipc://`` sockets go: ``data/run`` unless its paths would pass the OS
        limit, then a short per-data-dir folder under the temp dir."""
        longest = self.run.resolve() / "engine.sock"
        if len(str(longest)) <= IPC_PATH_LIMIT:
            return self.run
        digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        short = Path(tempfile.gettempdir()) / f"chorus-{digest}"
        short.mkdir(mode=0o700, exist_ok=True)
        owner = short.lstat()
        if not stat.S_ISDIR(owner.st_mode) or owner.st_uid != os.getuid():
            # the name is predictable: another user could have made it to catch our sockets
            raise ConfigError(
                f"{short} (for this data directory's sockets) is not a directory of this "
                "user's; remove it, or use a data directory with a shorter path"
            )
        if stat.S_IMODE(owner.st_mode) != 0o700:
            os.chmod(short, 0o700)
        log.info(
            "ipc_path_too_long",
            path=str(longest),
            limit=IPC_PATH_LIMIT,
            using=str(short),
        )
        return short

    def ipc(self, name: str) -> str:
        return f"ipc://{self.socket_dir() / name}.sock"

    def wait_for_endpoints(self, timeout: float = 30.0) -> Endpoints:
        """The endpoints once the broker has written them (a child may start first)."""
        deadline = time.monotonic() + timeout
        while not self.endpoints_file.exists():
            if time.monotonic() > deadline:
                raise NotRunning(
                    f"no broker runs for {self.root} (no {self.endpoints_file}); "
                    "start one with `python -m runtime launch`"
                )
            time.sleep(0.1)
        return self.read_endpoints()

    def read_endpoints(self) -> Endpoints:
        """The running instance's endpoints; raises FileNotFoundError if none runs."""
        return msgspec.json.decode(self.endpoints_file.read_bytes(), type=Endpoints)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write-to-temp, fsync, rename: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
