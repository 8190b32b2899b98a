"""Running the gateway: uvicorn inside the caller's event loop, and its command-line options.

``python -m runtime serve`` runs it on its own against an instance (started before or
after it); ``launch --serve`` runs it in the launch process, beside the supervisor,
so one Ctrl-C stops both. Either way the caller owns the signals (uvicorn's own
handlers are not installed) and stops the server with :meth:`GatewayServer.stop` or by
cancelling :meth:`GatewayServer.run`.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import structlog
import uvicorn

from ..errors import ConfigError
from ..paths import DataDir
from .app import GatewayConfig, create_app, is_loopback
from .auth import load_or_create_token, parse_rate
from .options import DEFAULT_HOST, DEFAULT_PORT

if TYPE_CHECKING:
    from ..settings import Settings

log = structlog.get_logger("gateway")

STOP_GRACE_S = 2.0  # open streams get this long to end before they are cut


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the caller owns SIGINT/SIGTERM and stops us with should_exit


@dataclass
class GatewayServer:
    """One gateway listening on ``host:port``; ``url`` is set once it listens."""

    config: GatewayConfig
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    debug: bool = False
    url: str = ""
    _server: _Server | None = field(default=None, repr=False)
    _done: anyio.Event = field(default_factory=anyio.Event, repr=False)
    _socket: socket.socket | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, data: DataDir) -> GatewayServer:
        """The gateway that ``settings`` (flags > CHORUS_* > env file > defaults) describe."""
        if not 0 <= settings.gateway_port <= 65535:
            raise ConfigError(f"--port {settings.gateway_port} is not a port (0-65535)")
        if settings.gateway_max_body < 1:
            raise ConfigError("--max-body takes a positive number of bytes")
        config = GatewayConfig(
            data=data,
            token=load_or_create_token(data.keys),
            allow_origins=tuple(settings.gateway_allow_origin),
            max_body_bytes=settings.gateway_max_body,
            streams_per_token=settings.gateway_max_streams,
            chat_per_minute=parse_rate(settings.gateway_rate_limit),
        )
        return cls(
            config, host=settings.gateway_host, port=settings.gateway_port, debug=settings.debug
        )

    def login_url(self) -> str:
        return f"{self.url}/login?token={self.config.token}"

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, print the login URL, report started, serve until stopped or cancelled."""
        sock = self._socket or self.listen()
        self.port = sock.getsockname()[1]
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        shown = "[::1]" if shown == "::" else f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{self.port}"
        server = self._server = _Server(
            uvicorn.Config(
                create_app(self.config),
                log_config=None,
                log_level="debug" if self.debug else "warning",
                access_log=self.debug,
                lifespan="on",
                ws="none",
                timeout_graceful_shutdown=int(STOP_GRACE_S),
            )
        )

        async def serve() -> None:
            with anyio.CancelScope(shield=True):  # ends by should_exit, gracefully
                try:
                    await server.serve(sockets=[sock])
                finally:
                    self._done.set()
                    sock.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            try:
                while not server.started:
                    if self._done.is_set():
                        raise ConfigError(f"the gateway on {self.url} did not start; see its log")
                    await anyio.sleep(0.02)
                self._announce()
                task_status.started()
                await self._done.wait()
            finally:
                server.should_exit = True

    async def stop(self) -> None:
        """Stop serving and wait until the server is down."""
        if self._server is None:
            return
        self._server.should_exit = True
        await self._done.wait()

    def listen(self) -> socket.socket:
        """Bind the address now (a taken port fails here, before anything else starts);
        :meth:`run` serves on it."""
        if self._socket is None:
            self._socket = self._bind()
        return self._socket

    def _bind(self) -> socket.socket:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.host!r}: {exc}; pass another --host"
            ) from exc
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                "pass another --port (0 picks a free one)"
            ) from exc
        return sock

    def _announce(self) -> None:
        if not is_loopback(self.host):
            print(
                f"WARNING: the gateway listens on {self.host}, reachable from other machines.\n"
                "WARNING: anyone with the token can chat and read the bus log; traffic is plain "
                "HTTP, so put a TLS proxy in front of it.",
                file=sys.stderr,
                flush=True,
            )
            log.warning("gateway_not_loopback", host=self.host)
        print(f"Gateway on {self.url} (API docs at {self.url}/docs)", flush=True)
        print(f"  open {self.login_url()} to chat in the browser", flush=True)
