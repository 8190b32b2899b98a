"""An app that embeds Chorus sets it up as ``launch`` is set up: from ``Settings`` given
to ``Runtime``, else from ``CHORUS_*`` variables. Real broker, real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.embed import Runtime
from runtime.paths import DataDir
from runtime.settings import Settings


async def test_settings_given_to_the_runtime_reach_its_processes(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    settings = Settings(max_bytes=2048, log_retain_days=3)
    embedded = Runtime(data.root, agents={}, engine=False, orchestration=False, settings=settings)
    async with embedded as rt:
        assert data.read_endpoints().max_bytes == 2048  # the broker's own word on its limit
        assert rt.supervisor is not None
        argv = rt.supervisor.children["broker"].spec.argv
        assert argv[argv.index("--log-retain-days") + 1] == "3.0"


async def test_chorus_variables_set_an_embedded_runtime_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHORUS_MAX_BYTES", "4096")
    data = DataDir(tmp_path / "data")
    async with Runtime(data.root, agents={}, engine=False, orchestration=False):
        assert data.read_endpoints().max_bytes == 4096
