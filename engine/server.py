"""The engine process: one model, many StreamingLLM sessions, served on a ROUTER socket.

``python -m engine serve`` binds ``data/run/engine.sock`` (CURVE; only the identities in
``runtime.acl.ENGINE_CALLERS`` get through the handshake) and runs one loop:

1. take every request that has arrived (never blocking while there is work),
2. feed at most one prefill chunk (long prompts take turns, so a short request is never
   stuck behind a long one),
3. advance every running generation by one token in **one** batched forward call,
4. send what became final, evict sessions idle for too long.

Everything happens on one thread, so a cancel is seen before the next decode step.
``engine.stats`` goes to the bus from a small thread of its own every 2 s.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psutil
import structlog
import torch
import zmq

from engine.cache import SinkCache
from engine.model import Model
from engine.protocol import (
    Append,
    Cancel,
    Chunk,
    Close,
    Complete,
    Done,
    ErrorKind,
    Failed,
    Generate,
    Message,
    Open,
    Reply,
    Stats,
    StatsReply,
    encoder,
    request_decoder,
)
from engine.sampling import Sampler, SamplingParams, SchemaError
from runtime.acl import ENGINE_CALLERS
from runtime.auth import Authenticator, identity_of
from runtime.keys import curve_server

log = structlog.get_logger("engine")

SENTINEL = "\x00chorus-sentinel\x00"
BACKGROUND_PREFILL_CHUNK = 32  # tokens per step of a background prompt (tens of ms on a CPU)
# Background work also waits this long after the last foreground work: between the turns
# of a conversation the other processes (controller, narrator, broker) need the CPU the
# engine would take, and the next request is usually only a moment away.
BACKGROUND_AFTER_IDLE_S = 0.5
# ... but under steady foreground work it still gets one step this often (a prefill chunk
# and a place in the decode batch), so it finishes in bounded time instead of waiting
# (and holding its session's cache) for as long as the load lasts.
BACKGROUND_EVERY_S = 0.25
MAX_BACKGROUND_JOBS = 4  # more are refused as busy: each holds a temporary session's cache
# A generation still waiting for its turn (queued behind other prefills, or a background
# job held back by foreground work) gets an empty chunk this often, so its caller tells a
# busy engine from a dead one (a client gives up after its timeout without a chunk: 30 s
# by default).
KEEPALIVE_S = 10.0


class RequestError(Exception):
    """A request the engine refuses; becomes a ``Failed`` reply."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class EngineConfig:
    sink: int = 4
    window: int = 1020
    max_sessions: int = 32
    idle_s: float = 900.0  # a session unused this long is evicted (SessionLost)
    prefill_chunk: int = 128  # tokens fed per loop turn
    max_append_tokens: int = 32_768
    max_new_tokens: int = 4096


@dataclass
class Session:
    owner: str
    name: str
    cache: SinkCache
    logits: torch.Tensor | None = None  # next-token logits after the last fed token  # [V]
    pending: list[int] = field(default_factory=list)  # fed before anything new
    last_used: float = field(default_factory=time.monotonic)
    busy: str | None = None  # the request generating from it
    temporary: bool = False  # a Complete's session: released when it ends
    prefilled_at: float = 0.0  # when it last had a prefill chunk (sessions take turns)


@dataclass
class Job:
    """A request in progress: tokens still to feed, then maybe a generation."""

    route: bytes
    request: str
    session: Session
    feed: collections.deque[int]
    sampler: Sampler | None = None  # set for Generate/Complete
    generated: int = 0
    background: bool = False  # advances only while no foreground job has work
    told_at: float = field(default_factory=time.monotonic)  # when it was last sent a chunk


class Templates:
    """The model's chat template, rendered incrementally for a session that grows."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        self.adds_bos = bool(
            tokenizer.bos_token_id is not None
            and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
        )
        self.reply_tail: list[int] = []
        if self.chat:
            base = [{"role": "system", "content": "x"}]
            rendered = self._render([*base, {"role": "assistant", "content": SENTINEL}], False)
            tail = rendered.split(SENTINEL, 1)[1] if SENTINEL in rendered else ""
            self.reply_tail = self.encode(tail)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        text: str = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return text

    def messages(self, messages: list[Message], generation_prompt: bool, first: bool) -> list[int]:
        """Tokens of new messages; mid-session, only what they add to the conversation."""
        new = [{"role": msg.role, "content": msg.content} for msg in messages]
        if not self.chat:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in new) + (
                "assistant: " if generation_prompt else ""
            )
            return self.text(text, first)
        if first:
            return self.encode(self._render(new, generation_prompt))
        base = [{"role": "system", "content": "x"}]
        prefix = self._render(base, False)
        full = self._render([*base, *new], generation_prompt)
        return self.encode(full[len(prefix) :] if full.startswith(prefix) else full)

    def text(self, text: str, first: bool) -> list[int]:
        ids = self.encode(text)
        return [self.tokenizer.bos_token_id, *ids] if first and self.adds_bos else ids


class EngineServer:
    """Serves one model until :meth:`stop`. Thread-confined: call :meth:`serve` once."""

    def __init__(
        self,
        model: Model,
        tokenizer: Any,
        endpoint: str,
        key_dir: Any,
        config: EngineConfig | None = None,
        model_name: str = "",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.endpoint = endpoint
        self.key_dir = key_dir
        self.config = config or EngineConfig()
        self.model_name = model_name
        self.templates = Templates(tokenizer)
        self.sessions: dict[tuple[str, str], Session] = {}
        self.lost: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self.prefills: collections.deque[Job] = collections.deque()
        self.streams: list[Job] = []
        self.forward_calls = 0
        self.decode_batches: collections.deque[int] = collections.deque(maxlen=1024)  # sizes
        self.tokens_generated = 0
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._stop = threading.Event()
        self._spare: list[SinkCache] = []
        self._proc = psutil.Process()
        self.ready = threading.Event()
        self.snapshot = self.stats()  # refreshed by the loop for the stats thread to read
        self._snapshot_at = 0.0
        self._foreground_at = 0.0  # when a foreground job last had work
        self._background_at = 0.0  # when background jobs last had a step
        self._kept_alive_at = 0.0

    # -- the loop --------------------------------------------------------------------------

    def serve(self) -> None:
        auth = Authenticator(self._ctx, self.key_dir, accept=ENGINE_CALLERS)
        auth.start()
        sock = self._ctx.socket(zmq.ROUTER)
        try:
            curve_server(sock, self.key_dir, "engine")
            sock.linger = 0
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
            if self.endpoint.startswith("ipc://"):
                os.unlink(self.endpoint[6:]) if os.path.exists(self.endpoint[6:]) else None
            sock.bind(self.endpoint)
            self.ready.set()
            log.info(
                "engine_ready",
                endpoint=self.endpoint,
                model=self.model_name,
                device=str(self.model.device),
            )
            while not self._stop.is_set():
                if sock.poll(self._poll_ms()):
                    self._receive_all(sock)
                self._step(sock)
                self._evict_idle()
                self._keep_alive(sock)
                if time.monotonic() - self._snapshot_at > 1.0:
                    self.snapshot, self._snapshot_at = self.stats(), time.monotonic()
        finally:
            sock.close(linger=0)
            auth.stop()
            self._ctx.term()
            if self.endpoint.startswith("ipc://") and os.path.exists(self.endpoint[6:]):
                os.unlink(self.endpoint[6:])

    def stop(self) -> None:
        self._stop.set()

    def _receive_all(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            route = frames[0].bytes
            caller = identity_of(frames[-1])
            self._handle(sock, route, caller, frames[-1].bytes if len(frames) == 2 else b"")

    def _send(self, sock: zmq.Socket[Any], route: bytes, reply: Reply) -> None:
        try:
            sock.send_multipart([route, encoder.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:  # a caller that went away; its replies have nowhere to go
            pass

    def _handle(self, sock: zmq.Socket[Any], route: bytes, caller: str, payload: bytes) -> None:
        try:
            request = request_decoder.decode(payload)
        # msgspec also lets out RecursionError (deep nesting) and UnicodeDecodeError
        except (
            msgspec.DecodeError,
            msgspec.ValidationError,
            RecursionError,
            UnicodeDecodeError,
        ) as exc:
            self._send(
                sock,
                route,
                Failed(id="", kind="bad_request", message=f"request does not decode: {exc}"),
            )
            return
        try:
            reply = self._dispatch(sock, route, caller, request)
        except RequestError as exc:
            reply = Failed(id=request.id, kind=exc.kind, message=str(exc))
        except Exception as exc:  # one bad request must not stop the engine for everyone
            log.exception("request_failed", request=type(request).__name__)
            reply = Failed(id=request.id, kind="internal", message=f"{type(exc).__name__}: {exc}")
        if reply is not None:
            self._send(sock, route, reply)

    def _dispatch(
        self, sock: zmq.Socket[Any], route: bytes, caller: str, request: Any
    ) -> Reply | None:
        match request:
            case Open(session=name, system_prompt=system):
                old = self.sessions.get((caller, name))
                if old is not None:  # a reset: the old session's queued work goes with it
                    self._cancel_session(sock, old)
                session = self._open(caller, name)
                if system:
                    prompt = [Message(role="system", content=system)]
                    self._queue(
                        route,
                        request.id,
                        session,
                        self.templates.messages(prompt, False, first=True),
                    )
                    return None
                return Done(id=request.id, tokens=0)
            case Append(session=name):
                session = self._session(caller, name)
                if session.busy:
                    raise RequestError("busy", f"session {name!r} is generating; cancel it or wait")
                first = session.cache.tokens_seen == 0 and not session.pending
                feed: list[int] = []
                if request.messages:
                    feed += self.templates.messages(
                        request.messages, request.generation_prompt, first
                    )
                if request.text:
                    feed += self.templates.text(request.text, first and not feed)
                if len(feed) > self.config.max_append_tokens:
                    raise RequestError(
                        "too_long",
                        f"{len(feed)} tokens in one append; the limit is {self.config.max_append_tokens}",
                    )
                self._queue(route, request.id, session, feed)
                return None
            case Generate(session=name, params=params):
                session = self._session(caller, name)
                if session.busy:
                    raise RequestError("busy", f"session {name!r} is already generating")
                if session.logits is None and not session.pending:
                    raise RequestError(
                        "bad_request", f"session {name!r} is empty; append a prompt first"
                    )
                self._queue(route, request.id, session, [], self._sampler(params))
                return None
            case Complete(params=params):
                sampler = self._sampler(params)
                if request.background and self._background_jobs() >= MAX_BACKGROUND_JOBS:
                    raise RequestError(
                        "busy", f"{MAX_BACKGROUND_JOBS} background requests are waiting already"
                    )
                session = self._temporary(caller)
                feed = (
                    self.templates.messages(request.messages, True, first=True)
                    if request.messages
                    else []
                )
                if request.prompt:
                    feed += self.templates.text(request.prompt, not feed)
                if not feed:
                    raise RequestError("bad_request", "complete needs a prompt or messages")
                if len(feed) > self.config.max_append_tokens:
                    raise RequestError(
                        "too_long",
                        f"{len(feed)} prompt tokens; the limit is {self.config.max_append_tokens}",
                    )
                self._queue(route, request.id, session, feed, sampler, request.background)
                return None
            case Cancel(request=target):
                self._cancel(sock, caller, target)
                return Done(id=request.id)
            case Close(session=name):
                closing = self.sessions.get((caller, name))
                if closing is not None:
                    self._cancel_session(sock, closing)
                    self._release(closing)
                return Done(id=request.id)
            case Stats():
                return self.stats(request.id)
        raise RequestError("bad_request", f"unknown request {type(request).__name__}")

    def _sampler(self, params: SamplingParams) -> Sampler:
        """The request's sampler, or a refusal naming what is wrong with its params."""
        if params.max_tokens > self.config.max_new_tokens:
            raise RequestError(
                "too_long",
                f"max_tokens {params.max_tokens} exceeds the limit of {self.config.max_new_tokens}",
            )
        try:
            return Sampler(params, self.tokenizer)
        except SchemaError as exc:
            raise RequestError("bad_request", str(exc)) from None

    # -- sessions ----------------------------------------------------------------------------

    def _new_cache(self) -> SinkCache:
        if self._spare:
            cache = self._spare.pop()
            cache.reset()
            return cache
        return self.model.new_cache(sink=self.config.sink, window=self.config.window)

    def _open(self, caller: str, name: str) -> Session:
        key = (caller, name)
        old = self.sessions.pop(key, None)
        if old is not None:
            self._release(old, keep_name=True)
        self._make_room()
        self.lost.pop(key, None)
        session = Session(caller, name, self._new_cache())
        self.sessions[key] = session
        return session

    def _temporary(self, caller: str) -> Session:
        return Session(caller, f"complete-{time.monotonic_ns()}", self._new_cache(), temporary=True)

    def _session(self, caller: str, name: str) -> Session:
        session = self.sessions.get((caller, name))
        if session is None:
            if (caller, name) in self.lost:
                raise RequestError(
                    "session_lost", f"session {name!r} was evicted after being idle; open it again"
                )
            raise RequestError("unknown_session", f"no session {name!r}; open it first")
        session.last_used = time.monotonic()
        return session

    def _release(self, session: Session, keep_name: bool = False) -> None:
        if not session.temporary:
            self.sessions.pop((session.owner, session.name), None)
        if len(self._spare) < 4:  # a few caches kept ready: allocating one costs ~50 MB of zeroing
            self._spare.append(session.cache)

    def _make_room(self) -> None:
        while len(self.sessions) >= self.config.max_sessions:
            idle = [s for s in self.sessions.values() if self._idle(s)]
            if not idle:
                raise RequestError(
                    "busy",
                    f"all {self.config.max_sessions} sessions are generating; try again shortly",
                )
            self._lose(min(idle, key=lambda s: s.last_used), "too many sessions")

    def _lose(self, session: Session, reason: str) -> None:
        log.info("session_evicted", session=session.name, owner=session.owner, reason=reason)
        self._release(session)
        self.lost[(session.owner, session.name)] = None
        while len(self.lost) > 10_000:
            self.lost.popitem(last=False)

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if self._idle(session) and now - session.last_used > self.config.idle_s:
                self._lose(session, "idle")

    def _idle(self, session: Session) -> bool:
        """Nothing queued or running: only such a session may be evicted (its cache is
        recycled, and a queued prompt must never land in another session's cache)."""
        return session.busy is None and not any(j.session is session for j in self.prefills)

    # -- work ---------------------------------------------------------------------------------

    def _queue(
        self,
        route: bytes,
        request: str,
        session: Session,
        feed: list[int],
        sampler: Sampler | None = None,
        background: bool = False,
    ) -> None:
        tokens = collections.deque([*session.pending, *feed])
        session.pending = []
        if sampler is not None:
            session.busy = request
        self.prefills.append(Job(route, request, session, tokens, sampler, background=background))

    def _poll_ms(self) -> int:
        """How long the loop may wait for requests: not at all while it has work."""
        if self._has_foreground():
            return 0
        if self.prefills or self.streams:  # background only: once the idle wait is over
            wait = BACKGROUND_AFTER_IDLE_S - (time.monotonic() - self._foreground_at)
            return max(0, math.ceil(wait * 1000))
        return 100

    def _has_foreground(self) -> bool:
        return any(not j.background for j in (*self.prefills, *self.streams))

    def _background_jobs(self) -> int:
        return sum(j.background for j in (*self.prefills, *self.streams))

    def _step(self, sock: zmq.Socket[Any]) -> None:
        # Background jobs (summaries) wait while any other job has work, and a moment
        # after: a foreground request is delayed by at most one small background step.
        now = time.monotonic()
        if self._has_foreground():
            self._foreground_at = now
        background = now - self._foreground_at >= BACKGROUND_AFTER_IDLE_S
        turn = not background and now - self._background_at >= BACKGROUND_EVERY_S
        if background or turn:
            self._background_at = now
        if self.prefills:
            self._prefill_one(sock, background=background)
            if turn:  # its share under load: one chunk of the oldest background prompt
                self._prefill_one(sock, background=True, only_background=True)
        if self.streams:
            self._decode_all(sock, background=background or turn)

    def _keep_alive(self, sock: zmq.Socket[Any]) -> None:
        """An empty chunk to every generation that has waited ``KEEPALIVE_S`` for a token."""
        now = time.monotonic()
        if now - self._kept_alive_at < KEEPALIVE_S / 4:
            return
        self._kept_alive_at = now
        for job in self._jobs():
            if job.sampler is not None and now - job.told_at >= KEEPALIVE_S:
                self._send(sock, job.route, Chunk(id=job.request, delta="", tokens=job.generated))
                job.told_at = now

    def _prefill_one(
        self, sock: zmq.Socket[Any], background: bool, only_background: bool = False
    ) -> None:
        job = self._next_prefill(background, only_background)
        if job is None:
            return
        if job.feed:
            limit = BACKGROUND_PREFILL_CHUNK if job.background else self.config.prefill_chunk
            n = min(limit, len(job.feed))
            chunk = [job.feed.popleft() for _ in range(n)]
            job.session.logits = self.model.prefill(chunk, job.session.cache, last_only=True)[-1]
            job.session.prefilled_at = time.monotonic()
            self.forward_calls += 1
        if job.feed:
            return  # its next chunk waits for the other sessions' turns
        self.prefills.remove(job)
        if job.sampler is None:
            self._send(sock, job.route, Done(id=job.request, tokens=job.session.cache.tokens_seen))
        else:
            self.streams.append(job)

    def _next_prefill(self, background: bool, only_background: bool = False) -> Job | None:
        """The oldest job of the session prefilled least recently: each session's jobs in
        order, and sessions take turns, so one session's backlog (a client flooding its
        conversation) never holds up the others."""
        firsts: dict[int, Job] = {}
        for job in self.prefills:
            if (background or not job.background) and (job.background or not only_background):
                firsts.setdefault(id(job.session), job)
        return min(firsts.values(), key=lambda j: j.session.prefilled_at, default=None)

    def _decode_all(self, sock: zmq.Socket[Any], background: bool) -> None:
        now = time.monotonic()
        feeding: list[tuple[Job, int]] = []
        waiting = [job for job in self.streams if job.background and not background]
        for job in self.streams:
            if job.background and not background:
                continue
            assert job.sampler is not None and job.session.logits is not None
            token = job.sampler.pick(job.session.logits)
            delta = job.sampler.accept(token)
            job.generated += 1
            self.tokens_generated += 1
            if job.sampler.finished:
                ended_on_stop_id = token in job.sampler.stop_ids
                job.session.pending = (
                    [] if ended_on_stop_id else [token]
                ) + self.templates.reply_tail
                self._finish(sock, job, delta, job.sampler.finish_reason or "stop")
            else:
                # one chunk per token, even before it makes text: progress and fairness show
                chunk = Chunk(id=job.request, delta=delta, tokens=job.generated)
                self._send(sock, job.route, chunk)
                job.told_at = now
                feeding.append((job, token))
        self._note_rate(len(self.streams) - len(waiting))
        self.streams = [job for job, _ in feeding] + waiting
        if feeding:
            tokens = [token for _, token in feeding]
            logits = self.model.decode(tokens, [job.session.cache for job, _ in feeding])  # [B, V]
            self.forward_calls += 1
            self.decode_batches.append(len(feeding))
            for (job, _), row in zip(feeding, logits, strict=True):
                job.session.logits = row

    def _finish(self, sock: zmq.Socket[Any], job: Job, delta: str, finish: Any) -> None:
        self._send(
            sock, job.route, Chunk(id=job.request, delta=delta, tokens=job.generated, finish=finish)
        )
        job.session.busy = None
        job.session.last_used = time.monotonic()
        if job.session.temporary:
            self._release(job.session)

    def _jobs(self) -> Iterator[Job]:
        yield from self.prefills
        yield from self.streams

    def _cancel(self, sock: zmq.Socket[Any], caller: str, target: str) -> None:
        for job in list(self._jobs()):
            if job.request == target and job.session.owner == caller:
                self._drop(sock, job)

    def _cancel_session(self, sock: zmq.Socket[Any], session: Session) -> None:
        for job in list(self._jobs()):
            if job.session is session:
                self._drop(sock, job)

    def _drop(self, sock: zmq.Socket[Any], job: Job) -> None:
        if job in self.prefills:
            self.prefills.remove(job)
        if job in self.streams:
            self.streams.remove(job)
        if job.sampler is not None:
            job.session.pending = list(job.feed) + (
                self.templates.reply_tail if job.generated else []
            )
            self._finish(sock, job, "", "cancelled")
        else:
            self._send(
                sock, job.route, Failed(id=job.request, kind="bad_request", message="cancelled")
            )

    # -- figures --------------------------------------------------------------------------------

    def _note_rate(self, tokens: int) -> None:
        now = time.monotonic()
        self._rate.append((now, tokens))
        while self._rate and now - self._rate[0][0] > 5.0:
            self._rate.popleft()

    def tokens_per_s(self) -> float:
        if len(self._rate) < 2:
            return 0.0
        span = self._rate[-1][0] - self._rate[0][0]
        return sum(n for _, n in list(self._rate)[1:]) / span if span > 0 else 0.0

    def stats(self, request_id: str = "") -> StatsReply:
        sessions = list(self.sessions.values())
        capacity = self.config.sink + self.config.window
        fill = sum(s.cache.fill for s in sessions) / (capacity * len(sessions)) if sessions else 0.0
        return StatsReply(
            id=request_id,
            model=self.model_name,
            device=str(self.model.device),
            dtype=str(self.model.dtype).removeprefix("torch."),
            sink=self.config.sink,
            window=self.config.window,
            sessions=len(sessions),
            active_requests=len(self.prefills) + len(self.streams),
            tokens_per_s=round(self.tokens_per_s(), 2),
            tokens_generated=self.tokens_generated,
            cache_fill=round(fill, 4),
            resident_mb=round(self._proc.memory_info().rss / 2**20, 1),
            forward_calls=self.forward_calls,
            tokenizer=str(getattr(self.tokenizer, "name_or_path", "") or ""),
        )
