"""What a controller that died left undone, read back from the bus log by the next one.

The bus acknowledges a ``user.in`` as it arrives, so a controller killed after that and
before it routed the turn takes the turn with it; and the cues it had sent but the
narrator never finished (which it would send again if the narrator restarted) live only
in its memory. The broker logs every envelope it forwards, so a new controller reads the
last ``RECOVER_S`` of ``user.in``, ``narrator.cue`` and ``narrator.decision`` back:

* a user turn no cue was sent for, and no task was made for, was never routed: it is
  handled again (or, when the log is redacted and its text is gone, the user is asked
  to say it again: the ``controller_restarted`` playbook);
* a cue with no ``finished`` decision from the narrator, and no later user turn in its
  conversation (which would have dropped it), is unfinished.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from runtime import messages as m

from .log.query import LogQuery, query_envelopes

log = structlog.get_logger("controller")

RECOVER_S = 300.0  # how far back a new controller looks for work left undone
TOPICS = ("user.in", "narrator.cue", "narrator.decision")


@dataclass
class Leftovers:
    turns: list[m.Envelope] = field(default_factory=list)  # never routed, oldest first
    unfinished: dict[str, tuple[str, m.Cue]] = field(default_factory=dict)  # cue id ->


def find(envelopes: Iterable[m.Envelope], served: set[str]) -> Leftovers:
    """The leftovers in ``envelopes`` (in log order); ``served``: user turns that tasks
    were made for (the task graph's ``turn``), so they were routed."""
    turns: dict[str, m.Envelope] = {}
    unfinished: dict[str, tuple[str, m.Cue]] = {}
    for envelope in envelopes:
        body = envelope.body
        conversation = envelope.conversation or envelope.id
        if isinstance(body, m.UserTurn) and envelope.topic == "user.in":
            turns.setdefault(envelope.id, envelope)
            # the narrator drops what it had queued in a conversation when the user speaks
            unfinished = {k: v for k, v in unfinished.items() if v[0] != conversation}
        elif isinstance(body, m.Cue) and envelope.sender == "controller":
            turns.pop(body.turn, None)
            unfinished[envelope.id] = (conversation, body)
        elif (
            isinstance(body, m.Decision)
            and envelope.sender == "narrator"
            and body.action == "finished"
        ):
            unfinished.pop(body.cue, None)
    never_routed = [e for turn, e in turns.items() if turn not in served]
    return Leftovers(never_routed, unfinished)


def read(log_dir: Path, served: set[str], now: float | None = None) -> Leftovers:
    """:func:`find` over the last ``RECOVER_S`` of the log; an unreadable log leaves
    nothing to recover (the new controller serves on, and says so in its log)."""
    since = (time.time() if now is None else now) - RECOVER_S
    query = LogQuery(since=since, topics=TOPICS)

    def warn(message: str) -> None:
        log.warning("recovery_log_line_skipped", reason=message)

    try:
        return find(query_envelopes(log_dir, query, warn=warn), served)
    except OSError as exc:
        log.warning("recovery_log_unreadable", error=str(exc))
        return Leftovers()


def redacted(text: str) -> bool:
    """Whether a user turn's text was redacted in the log (``--log-redact``)."""
    return text.startswith("<redacted ") and text.endswith(">")
