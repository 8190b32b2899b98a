"""The FastAPI app: routes, auth, limits and the JSON errors.

``create_app(GatewayConfig(...))`` builds it; its lifespan connects to the instance of
the data directory (waiting for one to start when none runs yet) as ``client`` and
``monitor`` through :func:`runtime.connect`. Every error is ``{"error": "..."}`` with a
4xx status; a 500 means a bug in the gateway.
"""

# no `from __future__ import annotations` here: FastAPI reads the routes' annotations,
# and some name types local to create_app

import importlib.util
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import msgspec
import structlog
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import messages as m
from ..chat import ANSWER_TIMEOUT_S
from ..embed import Connection, connect
from ..errors import ChorusError
from ..paths import DataDir
from . import auth, feeds
from . import models as api
from .metrics import CONTENT_TYPE, GatewayCounts, render

log = structlog.get_logger("gateway")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WEB_DIR = REPO_ROOT / "clients" / "typescript" / "dist" / "web"
MAX_LOG_ENTRIES = 1000

Errors = dict[int | str, dict[str, Any]]


def _errors(*codes: int) -> Errors:
    return {code: {"model": api.ErrorOut} for code in codes}


def _sse_responses(
    description: str, codes: tuple[int, ...], *, conversation_header: bool = False
) -> Errors:
    """The OpenAPI responses of a Server-Sent Events route: the stream, then ``codes``."""
    ok: dict[str, Any] = {
        "description": description,
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    if conversation_header:
        header = {"description": "the conversation id", "schema": {"type": "string"}}
        ok["headers"] = {"X-Chorus-Conversation": header}
    return {200: ok, **_errors(*codes)}


@dataclass(frozen=True)
class GatewayConfig:
    """What one gateway serves and how."""

    data: DataDir
    token: str
    allow_origins: tuple[str, ...] = ()  # CORS is off when empty
    max_body_bytes: int = 64 * 1024
    chat_per_minute: float = 60.0  # per token; 0 turns the limit off
    streams_per_token: int = 32  # open SSE responses (chat and events) at once
    preempt_grace_s: float = 3.0  # how long a superseded turn waits for the narrator's word
    answer_timeout_s: float = ANSWER_TIMEOUT_S
    web_dir: Path = DEFAULT_WEB_DIR


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Gateway:
    """The state behind the routes: the bus connection and what it has seen."""

    config: GatewayConfig
    conn: Connection | None = None
    observer: feeds.Observer = field(default_factory=feeds.Observer)
    turns: feeds.ActiveTurns = field(default_factory=feeds.ActiveTurns)
    counts: GatewayCounts = field(default_factory=GatewayCounts)
    limiter: auth.RateLimiter = field(init=False)
    streams: auth.StreamLimit = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = auth.RateLimiter(self.config.chat_per_minute)
        self.streams = auth.StreamLimit(self.config.streams_per_token)

    async def run(self) -> None:
        """Stay connected to the instance: wait for it, connect, watch, and start over
        when the connection ends."""
        data = self.config.data
        waiting_logged = False
        while True:
            if not data.endpoints_file.exists():
                if not waiting_logged:
                    log.info("gateway_waiting_for_instance", data=str(data.root))
                    waiting_logged = True
                await anyio.sleep(0.25)
                continue
            try:
                async with connect(data.root) as conn:
                    self._hold(await anyio.to_thread.run_sync(self._seed))
                    self.conn = conn
                    log.info("gateway_connected", data=str(data.root))
                    await self.observer.run(conn)
            except Exception as exc:  # zmq, a broken key, a vanished file: retry, never die
                log.warning("gateway_connection_failed", error=repr(exc))
            finally:
                self.conn = None
            await anyio.sleep(1.0)

    def _seed(self) -> list[m.Envelope]:
        """What the log says about before: the observer's state is set here, and the
        recent narrator chunks are returned for the event loop to hold."""
        pid_file = self.config.data.run / "launch.pid"
        try:
            since = pid_file.stat().st_mtime  # the instance's start
        except FileNotFoundError:
            since = time.time() - 3600
        self.observer.seed_from_log(self.config.data.logs, since=since)
        return feeds.recent_chunks(self.config.data.logs)

    def _hold(self, chunks: list[m.Envelope]) -> None:
        """Hold the log's recent chunks of the conversations not held yet (in the event
        loop: a held chunk may wake a tail). One held already keeps what it has: after a
        reconnect, its streams from the log would come after its newer ones."""
        tails = self.observer.tails
        fresh = {
            e.conversation for e in chunks if e.conversation and tails.get(e.conversation) is None
        }
        for chunk in chunks:
            if chunk.conversation in fresh:
                self.observer.see(chunk, live=False)

    def connection(self) -> Connection:
        if self.conn is None:
            raise HTTPException(
                503,
                f"no Chorus instance is connected (none runs against {self.config.data.root}, "
                "or it is starting); start one with `python -m runtime launch`",
            )
        return self.conn

    async def bus_alive(self) -> bool:
        """The monitor heard something lately, or a ping round-trips through the broker."""
        conn = self.conn
        if conn is None:
            return False
        if time.monotonic() - self.observer.last_seen < 3.0:
            return True
        nonce = m.new_id()
        with conn.subscribe("sys.ping") as pings:
            try:
                await conn.publish("sys.ping", m.Ping(nonce=nonce))
            except ChorusError:
                return False
            with anyio.move_on_after(1.0):
                async for envelope in pings:
                    if isinstance(envelope.body, m.Ping) and envelope.body.nonce == nonce:
                        return True
        return False

    async def conversation_known(self, conversation: str) -> bool:
        if conversation in self.observer.conversations:
            return True
        logs = self.config.data.logs
        found = await anyio.to_thread.run_sync(feeds.conversation_in_log, logs, conversation)
        if found:
            self.observer.remember(conversation)
        return found


# -- request size ----------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised while a request body is read, past the limit (FastAPI re-raises it)."""


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413, by Content-Length up front and
    by counting as a chunked body arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is over {self.max_bytes} bytes; send less"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(send, 400, "the Content-Length header is not a number")
                return
            if int(length) > self.max_bytes:
                await _send_error(send, 413, too_large)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(413, too_large)
            return message

        await self.app(scope, counted, send)


async def _send_error(send: Send, status: int, error: str) -> None:
    body = api.ErrorOut(error=error).model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- errors ----------------------------------------------------------------------------------


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}; the routes are listed at /docs"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs"
    return _error(exc.status_code, message, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(400, "the request body is not valid JSON")
    parts = []
    for e in errors[:3]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return _error(422, "invalid request: " + "; ".join(parts))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("gateway_error", path=request.url.path, error=repr(exc))
    return _error(500, f"the gateway failed on {request.url.path} ({type(exc).__name__}); a bug")


# -- the app ---------------------------------------------------------------------------------


def _swagger_static() -> Path | None:
    """Swagger UI's files from the ``swagger-ui-py`` package, so /docs needs no CDN."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if (static / "swagger-ui-bundle.js").exists() else None


_NOT_BUILT = """<!doctype html><meta charset="utf-8"><title>Chorus</title>
<h1>The web chat is not built</h1>
<p>Run <code>make setup</code> (it builds <code>clients/typescript</code>), then reload.
The HTTP API works without it: see <a href="/docs">/docs</a>.</p>
"""


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway for one data directory."""
    gateway = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(gateway.run)
            yield
            tg.cancel_scope.cancel()

    app = FastAPI(
        title="Chorus gateway",
        version="1",
        summary="Chat with the narrator and watch the agents over HTTP.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    if config.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allow_origins),
            allow_credentials=True,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Chorus-Conversation", "Retry-After"],
        )
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    bearer = HTTPBearer(auto_error=False, description="the token in data/keys/gateway.token")
    cookie = APIKeyCookie(name=auth.COOKIE, auto_error=False, description="set by GET /login")

    async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        from_cookie: Annotated[str | None, Security(cookie)],
    ) -> str:
        given = credentials.credentials if credentials is not None else from_cookie
        if not auth.token_matches(given, config.token):
            raise HTTPException(
                401,
                "missing or wrong token: send `Authorization: Bearer <token>` (the token is in "
                "data/keys/gateway.token) or open the login URL the gateway printed",
                headers={"WWW-Authenticate": "Bearer"},
            )
        assert given is not None
        return given

    Token = Annotated[str, Depends(require_token)]
    secured = _errors(401)

    # -- pages and health --------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, responses={503: {"description": "not built"}})
    async def web_chat() -> Response:
        """The web chat page (built from clients/typescript); 503 when it is not built."""
        index = config.web_dir / "index.html"
        try:
            return HTMLResponse(index.read_text())
        except FileNotFoundError:
            return HTMLResponse(_NOT_BUILT, status_code=503)

    app.mount(
        "/assets",
        StaticFiles(directory=config.web_dir / "assets", check_dir=False),
        name="assets",
    )

    @app.get("/login", status_code=303, responses={303: {"description": "to /"}, **secured})
    async def login(token: Annotated[str, Query(description="the gateway token")]) -> Response:
        """Check the token, set the ``chorus_token`` cookie and go to the chat page."""
        if not auth.token_matches(token, config.token):
            raise HTTPException(
                401, "wrong token in the login URL; use the URL the gateway printed"
            )
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(auth.COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/healthz")
    async def healthz() -> api.HealthOut:
        """Whether the gateway serves and the instance behind it is reachable."""
        return api.HealthOut(
            ok=True, bus=await gateway.bus_alive(), engine=gateway.observer.engine_up()
        )

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}}, **secured},
    )
    async def metrics(_: Token) -> Response:
        """Prometheus text: bus messages by topic, engine figures, agents, the gateway."""
        text = render(gateway.observer, gateway.counts, bus_up=gateway.conn is not None)
        return Response(text, media_type=CONTENT_TYPE)

    # -- the API -----------------------------------------------------------------------------

    @app.get("/v1/agents", responses=secured)
    async def agents(_: Token) -> api.AgentsOut:
        """Each process: name, state, last heartbeat, current task, restarts."""
        return api.AgentsOut(agents=gateway.observer.agent_list())

    def _open_stream(token: str) -> None:
        """Count a new SSE response for ``token``, or refuse it with 429 at the limit."""
        if not gateway.streams.acquire(token):
            raise HTTPException(
                429,
                f"too many open streams for this token (limit {config.streams_per_token}); "
                "end a chat or close an events feed, then retry",
                headers={"Retry-After": "1"},
            )

    def _stream(
        token: str,
        produce: Callable[[feeds.Emit], Awaitable[None]],
        headers: dict[str, str],
        done: Callable[[], None] | None = None,
    ) -> feeds.EventStream:
        """The SSE response for a stream :func:`_open_stream` counted."""
        gateway.counts.streams_open += 1

        def closed() -> None:
            gateway.counts.streams_open -= 1
            gateway.streams.release(token)
            if done is not None:
                done()

        return feeds.EventStream(produce, headers=headers, on_close=closed)

    @app.post(
        "/v1/chat",
        response_model=None,
        responses=_sse_responses(
            "the narrator's stream: `chunk`, `final`, `interrupted` and `error` events (see "
            "the ChunkEvent, FinalEvent, InterruptedEvent and ErrorEvent schemas)",
            (400, 401, 404, 413, 422, 429, 503),
            conversation_header=True,
        ),
    )
    async def chat(body: api.ChatIn, token: Token) -> Response:
        """Send a user turn; stream the narrator's answer as Server-Sent Events. A newer
        turn on the same conversation preempts this one (it ends with ``interrupted``)."""
        wait = gateway.limiter.wait_s(token)
        if wait > 0:
            gateway.counts.chat_rate_limited += 1
            raise HTTPException(
                429,
                f"too many chat requests (limit {config.chat_per_minute:g}/min); "
                f"retry in {wait:.1f} s",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        conn = gateway.connection()
        conversation = body.conversation
        if conversation is None:
            conversation = m.new_id()
        elif not await gateway.conversation_known(conversation):
            raise HTTPException(
                404,
                f"no conversation {conversation!r} is known; leave `conversation` out to start one",
            )
        _open_stream(token)  # no await from here on: the count and the response go together
        gateway.observer.remember(conversation)
        gateway.counts.chat_requests += 1
        turn = gateway.turns.begin(conversation)

        async def produce(emit: feeds.Emit) -> None:
            await feeds.follow_turn(
                conn,
                turn,
                body.text,
                emit,
                grace_s=config.preempt_grace_s,
                timeout_s=config.answer_timeout_s,
            )

        return _stream(
            token,
            produce,
            {"X-Chorus-Conversation": conversation},
            lambda: gateway.turns.end(turn),
        )

    @app.get(
        "/v1/chat/{conversation}/tail",
        response_model=None,
        responses=_sse_responses(
            "the rest of the answer, as the same events as `POST /v1/chat`",
            (401, 404, 422, 429),
            conversation_header=True,
        ),
    )
    async def chat_tail(
        conversation: str,
        token: Token,
        stream: Annotated[
            str | None,
            Query(description="the last stream the client saw; default: the latest turn's first"),
        ] = None,
        after: Annotated[
            int, Query(ge=-1, description="the last `seq` of `stream` the client saw")
        ] = -1,
    ) -> Response:
        """The rest of an answer whose response was lost: the turn's chunks after ``seq``
        ``after`` of ``stream`` (and its later streams), then live until the turn closes.
        The gateway holds the recent streams it has seen, and on connecting those of
        the last 10 minutes in the bus log."""
        held = gateway.observer.tails.get(conversation)
        if held is None:
            raise HTTPException(
                404,
                f"the gateway holds no answer of conversation {conversation!r} (it keeps "
                "recent streams seen since it connected; older text is in /v1/logs)",
            )
        if stream is not None and held.find(stream) is None:
            raise HTTPException(
                404,
                f"the gateway holds no stream {stream!r} of conversation {conversation!r} "
                "(it keeps a conversation's latest streams; older text is in /v1/logs)",
            )
        _open_stream(token)

        async def produce(emit: feeds.Emit) -> None:
            await feeds.follow_tail(
                held, conversation, stream, after, emit, timeout_s=config.answer_timeout_s
            )

        return _stream(token, produce, {"X-Chorus-Conversation": conversation})

    @app.get(
        "/v1/events",
        response_model=None,
        responses=_sse_responses(
            "`event: <topic>` with an envelope (EnvelopeOut) as data", (401, 429, 503)
        ),
    )
    async def events(
        token: Token,
        prefix: Annotated[
            list[str], Query(description="topic prefix (repeatable); default: all but user.out")
        ] = [],  # noqa: B006 (FastAPI copies defaults)
    ) -> Response:
        """The activity feed: task updates, heartbeats (summarised), decisions, ``sys.*``."""
        conn = gateway.connection()
        asked = tuple(prefix)
        _open_stream(token)

        async def produce(emit: feeds.Emit) -> None:
            await feeds.follow_bus(conn, asked, emit)

        return _stream(token, produce, {})

    @app.get("/v1/tasks", response_model=api.TasksOut, responses=_errors(401, 422))
    async def tasks(
        _: Token,
        state: Annotated[
            list[api.NodeStateName], Query(description="only these states (repeatable)")
        ] = [],  # noqa: B006
        conversation: Annotated[str | None, Query(description="only this conversation")] = None,
    ) -> Response:
        """The task graph's nodes, oldest first."""
        from orchestrator.task_graph import TaskGraph, TaskGraphError

        graph = TaskGraph(config.data.task_graph)
        try:
            nodes = await anyio.to_thread.run_sync(
                lambda: graph.nodes(states=state, conversation=conversation)
            )
        except TaskGraphError as exc:
            raise HTTPException(503, str(exc)) from None
        return _raw_json(msgspec.json.encode({"tasks": nodes}))

    @app.get("/v1/logs", response_model=api.LogsOut, responses=_errors(400, 401, 422))
    async def logs(
        _: Token,
        since: Annotated[str | None, Query(description="10m, 2h, 1d, ISO time or unix")] = None,
        until: Annotated[str | None, Query(description="same forms as since")] = None,
        topic: Annotated[list[str], Query(description="topic prefix (repeatable)")] = [],  # noqa: B006
        sender: Annotated[list[str], Query(description="sender (repeatable)")] = [],  # noqa: B006
        conversation: str | None = None,
        task: str | None = None,
        text: Annotated[str | None, Query(description="body text contains (any case)")] = None,
        limit: Annotated[int, Query(ge=0, le=MAX_LOG_ENTRIES)] = 100,
        order: Literal["newest", "oldest"] = "newest",
    ) -> Response:
        """The bus log, with the filters of ``python -m runtime logs``."""
        lines = await _query_log(
            since,
            until,
            topics=tuple(topic),
            senders=tuple(sender),
            conversation=conversation,
            task=task,
            text=text,
            limit=limit,
            newest_first=order == "newest",
        )
        return _raw_json(b'{"entries":[' + b",".join(lines) + b"]}")

    @app.get("/v1/decisions", response_model=api.DecisionsOut, responses=_errors(400, 401, 422))
    async def decisions(
        _: Token,
        since: Annotated[str | None, Query(description="10m, 2h, 1d, ISO time or unix")] = None,
        until: Annotated[str | None, Query(description="same forms as since")] = None,
        conversation: str | None = None,
        sender: Annotated[list[str], Query(description="sender (repeatable)")] = [],  # noqa: B006
        limit: Annotated[int, Query(ge=0, le=MAX_LOG_ENTRIES)] = 100,
        order: Literal["newest", "oldest"] = "newest",
    ) -> Response:
        """Why the narrator spoke or held (``narrator.decision``), from the log."""
        lines = await _query_log(
            since,
            until,
            topics=("narrator.decision",),
            senders=tuple(sender),
            conversation=conversation,
            limit=limit,
            newest_first=order == "newest",
        )
        return _raw_json(b'{"decisions":[' + b",".join(lines) + b"]}")

    async def _query_log(since: str | None, until: str | None, **filters: Any) -> list[bytes]:
        from orchestrator.log.query import LogQuery, parse_time, query_lines

        now = time.time()
        try:
            query = LogQuery(
                since=parse_time(since, now) if since else None,
                until=parse_time(until, now) if until else None,
                **filters,
            )
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        warnings: list[str] = []

        def run() -> list[bytes]:
            return list(query_lines(config.data.logs, query, warn=warnings.append))

        lines = await anyio.to_thread.run_sync(run)
        if warnings:
            log.warning("log_lines_skipped", count=len(warnings), first=warnings[0])
        return lines

    # -- docs without a CDN ------------------------------------------------------------------

    swagger = _swagger_static()
    if swagger is not None:
        app.mount("/docs-assets", StaticFiles(directory=swagger), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if swagger is None:  # the CDN's copy, for a build without swagger-ui-py
            return get_swagger_ui_html(openapi_url="/openapi.json", title="Chorus gateway")
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Chorus gateway",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    _add_event_schemas(app)
    return app


def _raw_json(body: bytes) -> Response:
    """JSON made by msgspec, or lines of the log (already envelope JSON): sent as they
    are; the route's ``response_model`` documents the shape."""
    return Response(body, media_type="application/json")


def _add_event_schemas(app: FastAPI) -> None:
    """Put the SSE data models into ``components.schemas`` of the OpenAPI document, and
    describe 422s as the ErrorOut they are."""
    from pydantic import BaseModel
    from pydantic.json_schema import models_json_schema

    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = base()
        models: list[tuple[type[BaseModel], Literal["validation"]]] = [
            (model, "validation") for model in api.SSE_MODELS
        ]
        _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(defs["$defs"])
        # a 422 here is an ErrorOut like every other error, not FastAPI's default body
        error = {"$ref": "#/components/schemas/ErrorOut"}
        for item in schema["paths"].values():
            for operation in item.values():
                invalid = operation.get("responses", {}).get("422")
                if invalid is not None:
                    invalid["content"] = {"application/json": {"schema": error}}
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
