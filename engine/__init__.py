"""The Chorus engine: a Llama-family model over StreamingLLM caches, and its sampling.

Public names live here; the modules behind them are the private core. Names are imported
on first use, so a process that only talks to the engine never loads torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.cache import SinkCache as SinkCache
    from engine.client import Client as Client
    from engine.errors import ModelLoadError as ModelLoadError
    from engine.model import Model as Model
    from engine.model import ModelArgs as ModelArgs
    from engine.sampling import Sampler as Sampler
    from engine.sampling import SamplingParams as SamplingParams
    from engine.weights import load_model as load_model

_HOMES = {  # public name -> module that defines it
    "Client": "engine.client",
    "Model": "engine.model",
    "ModelArgs": "engine.model",
    "ModelLoadError": "engine.errors",
    "Sampler": "engine.sampling",
    "SamplingParams": "engine.sampling",
    "SinkCache": "engine.cache",
    "load_model": "engine.weights",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
