"""Exceptions a caller of the engine can act on."""

from __future__ import annotations

from runtime.errors import ChorusError


class ModelLoadError(ChorusError):
    """A model could not be loaded: the message names the cause and what is supported."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))  # one line, whatever a cause printed
