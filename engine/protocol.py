"""What travels between ``engine.Client`` and the engine's ROUTER socket.

One msgpack frame per message, a tagged union each way. Every request carries an ``id``
chosen by the client; every reply names the request it answers.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from engine.sampling import SamplingParams


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One chat message; rendered with the model's own chat template."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Request(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    id: str


class Open(Request, frozen=True, kw_only=True):
    """Create a session (a StreamingLLM cache); re-opening an existing one resets it."""

    session: str
    system_prompt: str | None = None


class Append(Request, frozen=True, kw_only=True):
    """Add text or chat messages to a session. ``generation_prompt`` ends with the
    template's assistant header, ready for ``Generate``."""

    session: str
    text: str | None = None
    messages: list[Message] = []
    generation_prompt: bool = False


class Generate(Request, frozen=True, kw_only=True):
    """Stream tokens from a session's current state; they become part of the session."""

    session: str
    params: SamplingParams = SamplingParams()


class Cancel(Request, frozen=True, kw_only=True):
    """Stop a running ``Generate`` or ``Complete`` (``request`` is its id)."""

    request: str


class Close(Request, frozen=True, kw_only=True):
    session: str


class Complete(Request, frozen=True, kw_only=True):
    """One-shot: prompt in, tokens out, no session kept."""

    prompt: str | None = None
    messages: list[Message] = []
    params: SamplingParams = SamplingParams()
    background: bool = False  # runs only while no other request has work (summaries)


class Stats(Request, frozen=True, kw_only=True):
    pass


AnyRequest = Open | Append | Generate | Cancel | Close | Complete | Stats


class Reply(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    id: str  # the request this answers


class Done(Reply, frozen=True, kw_only=True):
    """A request without a stream finished. ``tokens``: the session's token count."""

    tokens: int = 0


class Chunk(Reply, frozen=True, kw_only=True):
    """Part of a stream: new text, how many tokens so far, and why it ended (last chunk)."""

    delta: str
    tokens: int
    finish: Literal["", "stop", "length", "cancelled"] = ""


ErrorKind = Literal[
    "bad_request", "unknown_session", "session_lost", "busy", "too_long", "forbidden", "internal"
]


class Failed(Reply, frozen=True, kw_only=True):
    kind: ErrorKind
    message: str


class StatsReply(Reply, frozen=True, kw_only=True):
    model: str
    device: str
    dtype: str
    sink: int
    window: int
    sessions: int
    active_requests: int
    tokens_per_s: float
    tokens_generated: int
    cache_fill: float
    resident_mb: float
    forward_calls: int
    tokenizer: str = ""  # a local folder holding the model's tokenizer.json, if there is one


AnyReply = Done | Chunk | Failed | StatsReply

request_decoder = msgspec.msgpack.Decoder(AnyRequest)
reply_decoder = msgspec.msgpack.Decoder(AnyReply)
encoder = msgspec.msgpack.Encoder()
