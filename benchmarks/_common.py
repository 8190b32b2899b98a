"""What every benchmark shares: where results go, writing them, and percentiles."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # matplotlib is slow to import; benchmark child processes never need it
    from matplotlib.figure import Figure

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir(quick: bool) -> Path:
    """``benchmarks/results/`` for a full run, ``benchmarks/results/quick/`` for ``--quick``."""
    path = RESULTS_DIR / "quick" if quick else RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, result: Mapping[str, Any], *, quick: bool) -> Path:
    """Write ``<name>.json`` into the results folder and return its path."""
    path = results_dir(quick) / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    return path


def save_plot(figure: Figure, name: str, *, quick: bool) -> Path:
    """Save ``<name>.png`` into the results folder and return its path."""
    path = results_dir(quick) / f"{name}.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated; NaN if empty."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
