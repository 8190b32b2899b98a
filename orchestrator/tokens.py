"""Counting tokens the way the engine's model does, for prompt budgets.

The engine says where its tokenizer lives (``stats().tokenizer``, a local folder: the
engine runs on this host). Loading its ``tokenizer.json`` with the ``tokenizers``
library takes a few milliseconds and no model. When the engine cannot say (it is down,
or its tokenizer has no ``tokenizer.json``), counts are estimated at four characters a
token, which overestimates English text for this model family and so stays in budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
import structlog

from engine.protocol import StatsReply
from runtime.errors import ChorusError

log = structlog.get_logger("tokens")

CHARS_PER_TOKEN = 4


class _StatsSource(Protocol):
    async def stats(self) -> StatsReply: ...


@dataclass
class TokenCounter:
    """``counter(text)`` -> tokens; ``exact`` says whether the model's tokenizer counts."""

    tokenizer: object | None = None  # a ``tokenizers.Tokenizer``

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return -(-len(text) // CHARS_PER_TOKEN)
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]

    @classmethod
    def from_folder(cls, folder: str | Path) -> TokenCounter:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            return cls()
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # a damaged file: estimate rather than fail the caller
            log.warning("tokenizer_unreadable", path=str(path), error=str(exc))
            return cls()

    @classmethod
    async def from_engine(cls, engine: _StatsSource | None) -> TokenCounter:
        """The engine's tokenizer, or the estimate when the engine cannot say."""
        if engine is None:
            return cls()
        try:
            stats = await engine.stats()
        except ChorusError as exc:
            log.info("token_estimate", reason=str(exc))
            return cls()
        return cls.from_folder(stats.tokenizer) if stats.tokenizer else cls()


class EngineCounter:
    """A process's counter: the engine's tokenizer once the engine has said where it
    is; the estimate until then, asking again at most every ``retry_s``."""

    def __init__(self, engine: _StatsSource | None, retry_s: float = 60.0) -> None:
        self.engine = engine
        self.retry_s = retry_s
        self._counter: TokenCounter | None = None
        self._asked = 0.0

    async def get(self) -> TokenCounter:
        now = time.monotonic()
        if self._counter is None or (not self._counter.exact and now - self._asked > self.retry_s):
            self._asked = now
            with anyio.move_on_after(5):
                self._counter = await TokenCounter.from_engine(self.engine)
        return self._counter or TokenCounter()
