"""``serve --host 0.0.0.0``: reachable from other machines, so it warns loudly and the
token is still required."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from runtime.paths import DataDir

if TYPE_CHECKING:
    from conftest import Gateway


async def test_listening_beyond_loopback_warns_and_still_needs_the_token(
    tmp_path: Path, gateway_on: Callable[..., Gateway]
) -> None:
    data = DataDir(tmp_path / "data")
    gw = await anyio.to_thread.run_sync(lambda: gateway_on(data, "--host", "0.0.0.0"))
    assert gw.url.startswith("http://127.0.0.1:")  # the wildcard is shown as a host to open
    warned = (tmp_path / "serve.stderr").read_text()
    assert "WARNING: the gateway listens on 0.0.0.0, reachable from other machines" in warned
    async with gw.client(auth=False) as anonymous:
        refused = await anonymous.get("/v1/agents")
        assert refused.status_code == 401 and "error" in refused.json()
        assert (await anonymous.get("/healthz")).status_code == 200  # health needs no token
    async with gw.client() as client:
        assert (await client.get("/v1/agents")).status_code in (200, 503)  # 503: no instance yet
