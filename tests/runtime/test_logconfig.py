"""Process logs: JSON lines to a file that is rotated by size and survives write errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from runtime import logconfig


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    config = structlog.get_config()
    yield
    logconfig.configure("test", console=True)  # closes the test's log file
    structlog.configure(**config)
    structlog.contextvars.clear_contextvars()


def test_a_process_log_is_rotated_by_size_and_keeps_its_newest_lines(tmp_path: Path) -> None:
    logconfig.configure("worker", log_dir=tmp_path, console=False, max_bytes=4096)
    log = structlog.get_logger("test")
    for i in range(1000):  # ~100 bytes a line: ~100 KB, far past 4 backups of 4 KiB
        log.info("tick", i=i)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["worker.log", *(f"worker.log.{n}" for n in range(1, logconfig.BACKUPS + 1))]
    assert all(p.stat().st_size <= 4096 + 200 for p in tmp_path.iterdir())
    # oldest to newest, the lines kept are the last ones written, whole and in order
    order = [f"worker.log.{n}" for n in range(logconfig.BACKUPS, 0, -1)] + ["worker.log"]
    kept = [
        json.loads(line)["i"]
        for name in order
        for line in (tmp_path / name).read_text().splitlines()
    ]
    assert kept == list(range(1000 - len(kept), 1000)) and len(kept) > 100


def test_a_log_that_cannot_be_written_does_not_stop_the_process(tmp_path: Path) -> None:
    logconfig.configure("worker", log_dir=tmp_path, console=False, max_bytes=1)
    (tmp_path / "worker.log.1").mkdir()  # rotation cannot rename onto a directory
    log = structlog.get_logger("test")
    for i in range(5):
        log.info("tick", i=i)  # every rotation fails; nothing is raised
    assert (tmp_path / "worker.log").exists()
