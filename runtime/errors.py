"""One exception type per failure a caller can act on."""

from __future__ import annotations


class ChorusError(Exception):
    """Base of every error Chorus raises on purpose; its message says what to do."""


class ConfigError(ChorusError):
    """A setting, key or file is missing or wrong."""


class NotRunning(ChorusError):
    """No Chorus instance runs against this data directory."""


class AlreadyRunning(ChorusError):
    """Another Chorus instance already runs against this data directory."""


class BusClosed(ChorusError):
    """The bus connection was closed by this process."""


class DeliveryTimeout(ChorusError):
    """A reliable message was not acknowledged in time."""


class MessageRejected(ChorusError):
    """The broker would not (or did not) accept a message; the message says why."""
