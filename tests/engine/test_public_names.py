"""``engine``'s public names resolve, and a process that only talks to the engine (its
client) does not load torch."""

from __future__ import annotations

import subprocess
import sys

import engine


def test_every_public_name_resolves() -> None:
    for name in engine.__all__:
        assert getattr(engine, name).__name__ == name


def test_the_client_comes_without_torch() -> None:
    code = "import sys, engine; engine.Client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
