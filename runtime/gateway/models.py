"""The gateway's request and response bodies, and the data of its Server-Sent Events.

These pydantic models are what ``/openapi.json`` publishes (the SSE data models are
added to its ``components.schemas`` too, so a client in another language can be typed
from that one file). Envelopes and task nodes keep the shape of the msgspec Structs in
``runtime.messages`` and ``orchestrator.task_graph``; a test holds them together.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CONVERSATION_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"

NodeStateName = Literal["queued", "assigned", "running", "succeeded", "failed", "cancelled"]


class ErrorOut(BaseModel):
    """Every error the gateway answers: one line naming the cause (and the fix)."""

    error: str = Field(examples=["missing or wrong token: send Authorization: Bearer <token>"])


class HealthOut(BaseModel):
    """``ok`` is true when the gateway serves; ``bus`` and ``engine`` say whether the
    instance behind it is reachable (the broker round-trips, the engine reports)."""

    ok: bool
    bus: bool
    engine: bool


class AgentOut(BaseModel):
    """One process of the instance, from its heartbeats and the supervisor's events.

    ``state``: ``starting``, ``idle``, ``busy``, ``stopping`` (what the agent says),
    ``silent`` (no heartbeat for 5 s), ``restarting`` (the supervisor restarts it),
    ``gave_up`` (the supervisor stopped restarting it).
    """

    name: str
    state: str
    last_heartbeat: float | None = Field(description="unix seconds of the last heartbeat")
    task: str | None
    restarts: int = Field(description="restarts seen since the instance started")


class AgentsOut(BaseModel):
    agents: list[AgentOut]


class ChatIn(BaseModel):
    """A user turn. Without ``conversation`` a new conversation starts (its id comes back
    in the ``X-Chorus-Conversation`` header); with one, it must be a conversation the
    gateway or the bus log has seen (else 404)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"text": "What is a list?"}]})

    text: str = Field(min_length=1, max_length=32_000)
    conversation: str | None = Field(default=None, pattern=CONVERSATION_PATTERN)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is blank: say something")
        return value


# -- the chat stream's events ------------------------------------------------------------


class ChunkEvent(BaseModel):
    """``event: chunk``: a piece of the narrator's text. ``notice`` marks a playbook or
    system notice (engine down, agent crashed) rather than a model answer."""

    conversation: str
    stream: str
    seq: int
    delta: str
    notice: bool


class FinalEvent(BaseModel):
    """``event: final``: one narrator stream ended. ``closes_turn`` means the answer to
    the turn is complete; the HTTP response ends after it."""

    conversation: str
    stream: str
    finish: Literal["done", "error"]
    sources: list[str]
    closes_turn: bool


class InterruptedEvent(BaseModel):
    """``event: interrupted``: a newer turn on the same conversation preempted this one;
    the response ends. ``stream`` is the narrator stream cut short ("" if none began)."""

    conversation: str
    stream: str


class ErrorEvent(BaseModel):
    """``event: error``: the turn could not be followed (bus closed, no answer in time);
    the response ends."""

    error: str


# -- envelopes, tasks, logs --------------------------------------------------------------


class EnvelopeOut(BaseModel):
    """A bus envelope as JSON (``data/schemas/Envelope.json``). ``sender`` is the identity
    the broker authenticated; ``body`` is tagged by its ``type``."""

    id: str
    topic: str
    sender: str
    ts: float
    seq: int
    conversation: str | None = None
    task: str | None = None
    body: dict[str, Any]


class TaskNodeOut(BaseModel):
    """A task graph node (``orchestrator.task_graph.TaskNode``)."""

    id: str
    kind: str
    state: NodeStateName
    conversation: str | None = None
    agent: str | None = None
    parent: str | None = None
    depends_on: list[str] = []
    created: float
    updated: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    result: str | None = None
    error: str | None = None
    turn: str | None = None  # the id of the user.in envelope the task serves


class TasksOut(BaseModel):
    tasks: list[TaskNodeOut]


class LogsOut(BaseModel):
    entries: list[EnvelopeOut]


class DecisionsOut(BaseModel):
    decisions: list[EnvelopeOut]


# the data of the chat stream's events and of the activity feed's
SSE_MODELS: tuple[type[BaseModel], ...] = (
    ChunkEvent,
    FinalEvent,
    InterruptedEvent,
    ErrorEvent,
    EnvelopeOut,
)
