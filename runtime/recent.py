"""A bounded memory of ids, for dropping what was already handled (re-sends, copies)."""

from __future__ import annotations

import collections


class RecentIds:
    """The last ``limit`` ids added; the oldest is forgotten first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, id_: str) -> bool:
        """Remember ``id_``; whether it is new (not among the last ``limit``)."""
        if id_ in self._ids:
            return False
        self._ids[id_] = None
        if len(self._ids) > self.limit:
            self._ids.popitem(last=False)
        return True

    def __contains__(self, id_: object) -> bool:
        return id_ in self._ids

    def __len__(self) -> int:
        return len(self._ids)
