"""Chorus runtime: the bus, the broker, the supervisor and the embedding API.

The public names: ``Runtime`` (start an instance in your event loop), ``connect``
(attach to a running one), ``Bus`` (a connection as one identity), the message types
in ``runtime.messages``, and the errors.
"""

from .bus import Bus as Bus
from .bus import Subscription as Subscription
from .embed import Connection as Connection
from .embed import Runtime as Runtime
from .embed import connect as connect
from .errors import AlreadyRunning as AlreadyRunning
from .errors import BusClosed as BusClosed
from .errors import ChorusError as ChorusError
from .errors import ConfigError as ConfigError
from .errors import NotRunning as NotRunning
from .paths import DataDir as DataDir

__all__ = [
    "AlreadyRunning",
    "Bus",
    "BusClosed",
    "ChorusError",
    "ConfigError",
    "Connection",
    "DataDir",
    "NotRunning",
    "Runtime",
    "Subscription",
    "connect",
]
