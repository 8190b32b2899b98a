"""One running instance per data directory, held by a lock on ``data/run/launch.pid``."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from .errors import AlreadyRunning
from .paths import DataDir


class InstanceLock:
    """An exclusive ``flock`` on the pid file; the OS drops it if the process dies."""

    def __init__(self, data: DataDir) -> None:
        self.path: Path = data.run / "launch.pid"
        self._file: IO[str] | None = None

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise AlreadyRunning(
                f"Chorus already runs against {self.path.parent.parent} (pid {pid}); "
                "stop it first, or pass another --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None
