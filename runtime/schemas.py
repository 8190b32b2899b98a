"""JSON Schemas generated from the message Structs, checked in under ``data/schemas/``.

``make schemas`` (``python -m runtime schemas --write``) rewrites them; a test fails when
the checked-in files differ from what the code generates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from . import messages as m

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "data" / "schemas"


def extra_types() -> dict[str, Any]:
    """Other Structs with a checked-in schema (added by the packages that own them)."""
    types: dict[str, Any] = {}
    try:
        from orchestrator.task_graph import TaskGraphFile, TaskNode  # type: ignore[import-not-found,unused-ignore]

        types["TaskNode"] = TaskNode
        types["TaskGraphFile"] = TaskGraphFile
    except ImportError:  # the task graph is optional until the data layer lands
        pass
    return types


def generate() -> dict[str, bytes]:
    """File name -> schema bytes, for the envelope, each body and the extra types."""
    out: dict[str, bytes] = {"Envelope.json": _dump(msgspec.json.schema(m.Envelope))}
    for body in m.BODY_TYPES:
        out[f"{body.__name__}.json"] = _dump(msgspec.json.schema(body))
    for name, typ in extra_types().items():
        out[f"{name}.json"] = _dump(msgspec.json.schema(typ))
    return out


def _dump(schema: dict[str, Any]) -> bytes:
    return (json.dumps(schema, indent=2, sort_keys=True) + "\n").encode()


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    """Write every schema; returns the names written. Stale files are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    fresh = generate()
    for stale in directory.glob("*.json"):
        if stale.name not in fresh:
            stale.unlink()
    for name, data in fresh.items():
        (directory / name).write_bytes(data)
    return sorted(fresh)


def drift(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that are missing, stale or differ from the code."""
    fresh = generate()
    on_disk = {p.name: p.read_bytes() for p in directory.glob("*.json")}
    names = set(fresh) | set(on_disk)
    return sorted(n for n in names if fresh.get(n) != on_disk.get(n))
