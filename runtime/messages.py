"""Every message on the bus: one envelope and a tagged union of bodies.

Frames on the wire are ``[topic, payload]``; ``payload`` is the msgpack encoding of an
:class:`Envelope`. The JSON Schemas under ``data/schemas/`` are generated from these
Structs (``make schemas``), so a subscriber in any language needs only msgpack and them.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from typing import Any, Literal

import msgspec

# -- bodies ------------------------------------------------------------------------------


class Body(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """Base of every body; the tag (class name) travels as ``type``."""


class UserTurn(Body, frozen=True, kw_only=True):
    """A user turn on ``user.in``."""

    text: str


Finish = Literal["", "done", "interrupted", "error"]


class Chunk(Body, frozen=True, kw_only=True):
    """One piece of the narrator's stream on ``user.out`` (or ``shadow.user.out``).

    ``seq`` counts chunks inside one stream, so a gap is visible. The last chunk of a
    stream has ``final=True``; ``finish`` says why it ended.
    """

    stream: str
    seq: int
    delta: str
    final: bool = False
    finish: Finish = ""
    notice: bool = False  # a playbook or system notice rather than a model answer
    sources: list[str] = msgspec.field(default_factory=list)
    closes_turn: bool = False  # on a final chunk: the answer to the user's turn is complete
    turn: str = ""  # envelope id of the user.in this stream is about
    cue: str = ""  # envelope id of the narrator.cue this stream speaks (shadow comparisons)
    again: bool = False  # said again after a broker restart: keep one of each (stream, seq)


class TaskAssign(Body, frozen=True, kw_only=True):
    """A task for one agent kind, on ``task.assign.<agent>``."""

    task: str
    kind: str
    text: str
    attempt: int = 1
    deadline_s: float = 120.0
    params: dict[str, str] = msgspec.field(default_factory=dict)


class TaskCancel(Body, frozen=True, kw_only=True):
    """Asks the agent holding ``task`` to stop it, on ``task.assign.<agent>``."""

    task: str
    reason: str = ""


TaskState = Literal["accepted", "progress", "result", "failed", "cancelled"]


class TaskUpdate(Body, frozen=True, kw_only=True):
    """Progress of a task, published by the agent that holds it on ``task.update``."""

    task: str
    state: TaskState
    message: str = ""
    progress: float | None = None  # 0..1 when the agent can tell
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    sources: list[str] = msgspec.field(default_factory=list)
    artefacts: list[str] = msgspec.field(default_factory=list)


CueKind = Literal["answer", "ack", "progress", "result", "playbook"]


class Cue(Body, frozen=True, kw_only=True):
    """The controller tells the narrator that it may speak now, and about what.

    ``kind`` says what the utterance is: an ``answer`` to a user turn needing no agent,
    an ``ack`` that work started, ``progress``, a ``result``, or a ``playbook`` message
    (``playbook`` names it). ``cover`` lists what to talk about, ``sources`` what the
    narrator attaches by code. A cue with ``preempt`` stops the current utterance.
    """

    speak_now: bool
    priority: int
    reason: str
    kind: CueKind = "answer"
    cover: list[str] = msgspec.field(default_factory=list)
    sources: list[str] = msgspec.field(default_factory=list)
    playbook: str = ""
    tasks: list[str] = msgspec.field(default_factory=list)
    user_text: str = ""
    preempt: bool = False
    closes_turn: bool = False  # nothing more will be said about this turn after it
    attachments: list[str] = msgspec.field(default_factory=list)  # shown verbatim (program output)
    turn: str = ""  # envelope id of the user.in this cue is about


class Decision(Body, frozen=True, kw_only=True):
    """Why something was or was not said, on ``narrator.decision``.

    The narrator also reports each utterance's start (``spoken``) and end (``finished``,
    with ``reason`` done/interrupted/error), which is how the controller knows when the
    narrator is speaking.
    """

    action: Literal["spoken", "finished", "held", "coalesced", "preempted", "dropped"]
    reason: str
    cue: str = ""  # envelope id of the cue this decision is about
    tasks: list[str] = msgspec.field(default_factory=list)


class Heartbeat(Body, frozen=True, kw_only=True):
    """Liveness of one process, every second on ``heartbeat.<name>``."""

    state: Literal["starting", "idle", "busy", "stopping"]
    task: str | None = None
    queue_depth: int = 0
    load: float = 0.0
    pid: int = 0


class EngineStats(Body, frozen=True, kw_only=True):
    """The engine's figures, on ``engine.stats``. ``name``: ``engine``, or
    ``engine-candidate`` for the second engine that serves a canary's candidate model."""

    tokens_per_s: float
    sessions: int
    active_requests: int
    cache_fill: float
    device: str
    resident_mb: float
    name: str = "engine"


class ConfigChange(Body, frozen=True, kw_only=True):
    """A run-time setting, on ``sys.config`` (operator only)."""

    key: str
    value: str


class Ack(Body, frozen=True, kw_only=True):
    """Receipt of a reliable message, on ``ack.<original sender>``."""

    id: str


class Ping(Body, frozen=True, kw_only=True):
    """A round trip through the broker (``sys.ping``), used to see it is up."""

    nonce: str


class Rejected(Body, frozen=True, kw_only=True):
    """The broker dropped a message it could not accept (``sys.rejected``)."""

    sender: str
    topic: str
    reason: str
    id: str | None = None  # the envelope's id, when it decoded (its sender stops re-sending)


class Violation(Body, frozen=True, kw_only=True):
    """The broker dropped a message that broke the ACL (``sys.violation``)."""

    identity: str
    topic: str
    reason: str


class ProcessEvent(Body, frozen=True, kw_only=True):
    """The supervisor's word on a child: ``sys.started``, ``sys.stopped``,
    ``sys.restart``, ``sys.gave_up`` or ``sys.silent`` (no heartbeat, or for the engine
    no ``engine.stats``, for 5 s)."""

    process: str
    reason: str = ""
    restarts: int = 0
    pid: int = 0


FaultKind = Literal[
    "storage_error",  # a file under data/ could not be written
    "engine_error",
    "internal",
    "bad_input",
    "timeout",
    "config",  # a setting or a file it names is unusable (a corpus, an index)
    "sandbox",  # the coder's sandbox cannot start or confine a program
]


class Fault(Body, frozen=True, kw_only=True):
    """A process reports its own fault on ``event.<name>``."""

    kind: FaultKind
    message: str


class ArmFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One narrator voice's record in a canary: utterances made with the model, how many
    failed, and the median time to its first token (None until one came)."""

    samples: int = 0
    errors: int = 0
    first_token_s: float | None = None


RolloutAction = Literal["start", "change", "rollback", "promote", "skipped", "report"]


class Rollout(Body, frozen=True, kw_only=True):
    """A canary switch of the narrator, on ``event.narrator``: the candidate voice started
    on ``percent`` of conversations, its share changed, it was rolled back or promoted, it
    was ``skipped`` (rolled back before: not started again), or a periodic ``report``."""

    action: RolloutAction
    candidate: str  # the candidate voice's fingerprint (prompt, sampling, engine)
    baseline: str  # the baseline voice's fingerprint
    percent: float  # share of conversations on the candidate after this switch
    reason: str = ""
    candidate_figures: ArmFigures = msgspec.field(default_factory=ArmFigures)
    baseline_figures: ArmFigures = msgspec.field(default_factory=ArmFigures)


class Note(Body, frozen=True, kw_only=True):
    """Anything else an agent finds worth recording, on ``event.<name>``."""

    name: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


AnyBody = (
    UserTurn
    | Chunk
    | TaskAssign
    | TaskCancel
    | TaskUpdate
    | Cue
    | Decision
    | Heartbeat
    | EngineStats
    | ConfigChange
    | Ack
    | Ping
    | Rejected
    | Violation
    | ProcessEvent
    | Fault
    | Rollout
    | Note
)

BODY_TYPES: tuple[type[Body], ...] = (
    UserTurn,
    Chunk,
    TaskAssign,
    TaskCancel,
    TaskUpdate,
    Cue,
    Decision,
    Heartbeat,
    EngineStats,
    ConfigChange,
    Ack,
    Ping,
    Rejected,
    Violation,
    ProcessEvent,
    Fault,
    Rollout,
    Note,
)


# -- the envelope ------------------------------------------------------------------------


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """What travels on the bus. ``sender`` must equal the publisher's CURVE identity."""

    id: str
    topic: str
    sender: str
    ts: float
    seq: int
    body: AnyBody
    conversation: str | None = None
    task: str | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode(envelope: Envelope) -> bytes:
    """msgpack bytes of an envelope."""
    return _encoder.encode(envelope)


def decode(payload: bytes | memoryview) -> Envelope:
    """An envelope from msgpack bytes; raises ``msgspec.DecodeError`` or
    ``msgspec.ValidationError`` (a subclass) on anything else."""
    try:
        return _decoder.decode(payload)
    # msgspec lets these two out: it recurses once per level of nesting (in ``Note.data``
    # or a field it skips), and a string that is not UTF-8 fails as in ``bytes.decode``.
    # A few bytes from any peer must not take down a reader of the bus (the broker first).
    except RecursionError:
        raise msgspec.DecodeError("payload is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(
            f"payload holds a string that is not UTF-8 ({exc.reason})"
        ) from None


def new_id() -> str:
    """A unique envelope or stream id."""
    return uuid.uuid4().hex


class Stamper:
    """Builds envelopes for one sender: unique ids and a per-sender ``seq``."""

    def __init__(self, sender: str) -> None:
        self.sender = sender
        self._seq = itertools.count(1)
        # ids carry the pid so two incarnations of a process never collide
        self._prefix = f"{sender}-{os.getpid():x}-{uuid.uuid4().hex[:8]}-"
        self._ids = itertools.count(1)

    def stamp(
        self,
        topic: str,
        body: Body,
        *,
        conversation: str | None = None,
        task: str | None = None,
    ) -> Envelope:
        return Envelope(
            id=f"{self._prefix}{next(self._ids)}",
            topic=topic,
            sender=self.sender,
            ts=time.time(),
            seq=next(self._seq),
            body=body,  # type: ignore[arg-type]
            conversation=conversation,
            task=task,
        )
