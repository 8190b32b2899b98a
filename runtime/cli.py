"""``python -m runtime``: launch, the broker and agent processes, and the inspection tools."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from . import logconfig, schemas
from . import messages as m
from .errors import ChorusError, ConfigError, NotRunning
from .gateway import options as gateway_options
from .keys import ensure_keys
from .paths import DataDir, Endpoints
from .settings import Settings, env_example
from .settings import from_args as settings_from_args

log = structlog.get_logger("cli")


def _common(p: argparse.ArgumentParser) -> None:
    # flags default to None (unset) so that runtime.settings can tell them from
    # CHORUS_* variables and the env file: flags > environment > env file > defaults
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (default: $CHORUS_DATA_DIR or ./data)",
    )
    p.add_argument("--debug", action="store_true", default=None, help="verbose logs and tracebacks")
    p.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="log JSON lines to data/logs/process/ (used for child processes)",
    )
    p.add_argument(
        "--env-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="read CHORUS_* settings from this file (default: $CHORUS_ENV_FILE or ./.env.sidecar if present)",
    )


def _broker_limits(p: argparse.ArgumentParser) -> None:
    """The broker's message limit and bus-log retention (``launch`` passes them on)."""
    p.add_argument(
        "--max-bytes", type=int, metavar="BYTES", help="largest accepted message (default 1 MiB)"
    )
    p.add_argument(
        "--log-retain-days",
        type=float,
        metavar="DAYS",
        help="drop bus-log hours older than this (default 14)",
    )
    p.add_argument(
        "--log-retain-mb",
        type=float,
        metavar="MB",
        help="drop the oldest bus-log files above this size (default 1024)",
    )
    p.add_argument(
        "--log-redact",
        action="store_true",
        default=None,
        help="write user and narrator text to the bus log as hashes",
    )


def _rollout_options(p: argparse.ArgumentParser) -> None:
    """The narrator's voice, a candidate voice, the shadow and the canary (docs/rollout.md)."""
    g = p.add_argument_group("narrator rollout (docs/rollout.md)")
    g.add_argument("--narrator-prompt", type=Path, metavar="PATH", help="the narrator's prompt")
    g.add_argument(
        "--narrator-sampling", metavar="K=V,…", help="e.g. temperature=0.3,max_tokens=96"
    )
    g.add_argument(
        "--candidate-prompt",
        "--shadow-prompt",
        type=Path,
        metavar="PATH",
        help="a candidate narrator's prompt (for the shadow and the canary)",
    )
    g.add_argument(
        "--candidate-sampling", "--shadow-sampling", metavar="K=V,…", help="its sampling"
    )
    g.add_argument("--candidate-engine", metavar="ENDPOINT", help="its own engine")
    g.add_argument(
        "--candidate-model",
        metavar="PATH",
        help="its own model, served by a second engine that launch starts",
    )
    g.add_argument(
        "--shadow-narrator",
        action="store_true",
        default=None,
        help="run the candidate as narrator-shadow (shadow.user.out, never shown to users)",
    )
    g.add_argument(
        "--canary-percent", type=float, metavar="P", help="conversations on the candidate (0)"
    )
    g.add_argument(
        "--canary-min-samples", type=int, metavar="N", help="utterances before judging (20)"
    )
    g.add_argument(
        "--canary-max-error-delta", type=float, metavar="X", help="error-rate margin (0.05)"
    )
    g.add_argument(
        "--canary-max-latency-ratio", type=float, metavar="X", help="first-token ratio (1.5)"
    )
    g.add_argument(
        "--canary-timeout-s", type=float, metavar="S", help="the candidate's engine timeout (60)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime", description="Chorus: many agents work, one voice speaks."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("launch", help="start every process (and a chat when stdin is a terminal)")
    _common(p)
    p.add_argument(
        "--bind", help="broker endpoint tcp://127.0.0.1:PORT (default: ipc sockets under data/run)"
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        default=None,
        help="let the broker (and the engine, --engine-bind) bind a non-loopback address",
    )
    p.add_argument(
        "--engine-bind",
        help="engine endpoint tcp://127.0.0.1:PORT, for workers on other hosts "
        "(default: an ipc socket under data/run)",
    )
    _broker_limits(p)
    p.add_argument(
        "--model",
        help="a local Hugging Face directory or .gguf file (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--sink", type=int, help="attention sink tokens (default 4)")
    p.add_argument("--window", type=int, help="rolling window tokens (default 1020)")
    p.add_argument(
        "--engine-threads",
        type=int,
        metavar="N",
        help="CPU threads for the model's math (default: one per core but one)",
    )
    p.add_argument(
        "--engine-idle-s",
        type=float,
        metavar="SECONDS",
        help="the engine evicts sessions idle this long (default 900)",
    )
    p.add_argument(
        "--no-engine",
        action="store_true",
        default=None,
        help="start without the engine (bus and agents only)",
    )
    p.add_argument("--ask", metavar="QUESTION", help="ask one question, print the answer, and exit")
    p.add_argument(
        "--corpus",
        type=Path,
        help="index this folder of text/markdown for search and rag (default: the Python docs)",
    )
    p.add_argument(
        "--serve", action="store_true", help="run the HTTP gateway too (options as for `serve`)"
    )
    _rollout_options(p)
    gateway_options.add_arguments(p)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("serve", help="the HTTP gateway: API and web chat for a running instance")
    _common(p)
    gateway_options.add_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("broker", help="run the broker alone")
    _common(p)
    p.add_argument("--bind", help="tcp://HOST:PORT for publishers (subscribers get PORT+1)")
    p.add_argument(
        "--allow-remote", action="store_true", default=None, help="allow a non-loopback --bind"
    )
    _broker_limits(p)
    p.add_argument("--engine-endpoint", help="the engine's endpoint, written to endpoints.json")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("agent", help="run one agent, here or on another host")
    p.add_argument("name", help="the agent's identity (coder, search, rag)")
    p.add_argument(
        "--connect",
        type=Path,
        required=True,
        help="the instance's data dir, or a copy of its endpoints.json",
    )
    p.add_argument("--keys", type=Path, help="key directory (default: <data dir>/keys)")
    p.add_argument("--impl", help="module:Class of the agent (default: the built-in one)")
    _common(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("tail", help="print live bus messages (monitor identity)")
    p.add_argument(
        "prefixes", nargs="*", metavar="PREFIX", help="topic prefixes (default: everything)"
    )
    p.add_argument("--json", action="store_true", help="one JSON envelope per line")
    _common(p)
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("config", help="change run-time settings (operator identity)")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    _common(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("settings", help="print the settings in force and where they came from")
    _common(p)
    p.add_argument(
        "--env-example", action="store_true", help="print .env.sidecar.example (every default)"
    )
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("schemas", help="check or rewrite data/schemas/")
    p.add_argument("--write", action="store_true", help="rewrite the checked-in schemas")
    _common(p)
    p.set_defaults(func=cmd_schemas)

    for name, module, runner, helptext in (
        ("logs", "orchestrator.log.query", "run_logs", "query the bus log"),
        ("tasks", "orchestrator.task_graph", "run_tasks", "show the task graph"),
        (
            "decisions",
            "orchestrator.log.query",
            "run_decisions",
            "show when the narrator spoke and why",
        ),
    ):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        try:
            mod = importlib.import_module(module)
        except ImportError:
            p.set_defaults(func=_missing(name))
            continue
        mod.add_arguments(p) if name != "decisions" else mod.add_decision_arguments(p)
        p.set_defaults(func=_data_command(getattr(mod, runner)))
    return parser


def _missing(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise ConfigError(f"`{name}` is not available in this build")

    return run


def _data_command(
    runner: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        args.data_dir = DataDir.at(args.data_dir).root
        return runner(args)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings_from_args(args)
    except ChorusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = DataDir.at(args.data_dir)
    process = args.command if args.command != "agent" else args.name
    logconfig.configure(
        process,
        log_dir=data.process_logs if args.log_json else None,
        debug=args.debug,
        console=False if args.log_json else None,
    )
    try:
        code: int = args.func(args)
        return code
    except ChorusError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# -- commands ---------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    from .broker import serve

    data = DataDir.at(args.data_dir)
    data.ensure()
    ensure_keys(data.keys)
    serve(
        data,
        bind=args.bind,
        allow_remote=args.allow_remote,
        max_bytes=args.max_bytes,
        engine_endpoint=args.engine_endpoint,
        log_retain_days=args.log_retain_days,
        log_retain_mb=args.log_retain_mb,
        log_redact=args.log_redact,
    )
    return 0


def _child_environment(settings: Settings, corpus_flag: bool) -> None:
    """The settings the children have always read from their environment."""
    if settings.corpus is not None:
        if corpus_flag:  # --corpus takes one folder; CHORUS_CORPUS a list the agents check
            corpus = Path(settings.corpus)
            if not corpus.is_dir():
                raise ConfigError(f"--corpus {corpus} is not a folder")
            os.environ["CHORUS_CORPUS"] = str(corpus.resolve())
        else:
            os.environ["CHORUS_CORPUS"] = settings.corpus
    os.environ["CHORUS_RAG_METHOD"] = settings.rag_method
    if settings.cache_dir is not None:
        os.environ["CHORUS_CACHE_DIR"] = str(settings.cache_dir.expanduser())


def _flags(*pairs: tuple[str, object]) -> tuple[str, ...]:
    """``--flag value`` for every value that is set; a bool is a bare flag when true."""
    out: list[str] = []
    for flag, value in pairs:
        if value is None or value is False:
            continue
        out += [flag] if value is True else [flag, str(value)]
    return tuple(out)


def child_flags(
    settings: Settings,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The broker's, the engine's and the controller's flags for ``settings``
    (``default_specs`` adds the data directory and the log options every child gets)."""
    broker = _flags(
        ("--bind", settings.bind),
        ("--allow-remote", settings.allow_remote and settings.bind is not None),
        ("--max-bytes", settings.max_bytes),
        ("--log-retain-days", settings.log_retain_days),
        ("--log-retain-mb", settings.log_retain_mb),
        ("--log-redact", settings.log_redact),
    )
    engine = _flags(
        ("--bind", settings.engine_bind),
        ("--allow-remote", settings.allow_remote and settings.engine_bind is not None),
        ("--model", settings.model),
        ("--device", settings.device),
        ("--sink", settings.sink),
        ("--window", settings.window),
        ("--threads", settings.engine_threads),
        ("--idle-s", settings.engine_idle_s),
    )
    controller = _flags(
        ("--min-gap-s", settings.gate_min_gap_s),
        ("--idle-s", settings.gate_idle_s),
        ("--coalesce-s", settings.gate_coalesce_s),
    )
    return broker, engine, controller


def candidate_engine_flags(settings: Settings) -> tuple[str, ...] | None:
    """The flags of the second engine that serves the candidate's model: the engine's,
    with ``candidate_model`` (None: no candidate model); raises ConfigError when the
    candidate's engine is asked for twice, or with no engine at all."""
    if settings.candidate_model is None:
        return None
    if settings.candidate_engine:
        raise ConfigError(
            "set --candidate-model (launch serves it) or --candidate-engine (an engine you "
            "run), not both"
        )
    if not settings.engine:
        raise ConfigError("--candidate-model needs the engine; it is switched off (--no-engine)")
    # its own ipc socket: --engine-bind is the first engine's
    candidate = {"model": settings.candidate_model, "engine_bind": None}
    _, engine, _ = child_flags(settings.model_copy(update=candidate))
    return engine


def narrator_flags(settings: Settings) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """The narrator's flags and the shadow narrator's (None: no shadow) for ``settings``;
    raises ConfigError when a prompt, a sampling or the canary's policy is not valid."""
    from orchestrator.canary import Policy, Voice
    from orchestrator.narrator import FORGET_S

    candidate = Voice(
        settings.candidate_prompt, settings.candidate_sampling, settings.candidate_engine
    )
    has_candidate = candidate != Voice()
    Voice(settings.narrator_prompt, settings.narrator_sampling).check("narrator prompt/sampling")
    candidate.check("candidate prompt/sampling")
    if settings.canary_percent > 0 and not has_candidate:
        raise ConfigError(
            "a canary needs a candidate narrator: set --candidate-prompt, "
            "--candidate-sampling or --candidate-engine (or CHORUS_CANDIDATE_*)"
        )
    try:
        Policy(
            settings.canary_percent,
            settings.canary_min_samples,
            settings.canary_max_error_delta,
            settings.canary_max_latency_ratio,
        )
    except ValueError as exc:
        raise ConfigError(f"canary: {exc}") from None

    def path(value: Path | None) -> str | None:
        return None if value is None else str(value.expanduser().resolve())

    # the narrator forgets a quiet conversation when the engine evicts its session
    forget = settings.engine_idle_s if settings.engine_idle_s != FORGET_S else None
    narrator = _flags(
        ("--prompt", path(settings.narrator_prompt)),
        ("--sampling", settings.narrator_sampling or None),
        ("--forget-s", forget),
    )
    if has_candidate:
        narrator += _flags(
            ("--candidate-prompt", path(candidate.prompt)),
            ("--candidate-sampling", candidate.sampling or None),
            ("--candidate-engine", candidate.engine),
            ("--canary-percent", settings.canary_percent),
            ("--canary-min-samples", settings.canary_min_samples),
            ("--canary-max-error-delta", settings.canary_max_error_delta),
            ("--canary-max-latency-ratio", settings.canary_max_latency_ratio),
            ("--canary-timeout-s", settings.canary_timeout_s),
        )
    shadow = None
    if settings.shadow_narrator:  # the candidate's voice, or the narrator's if there is none
        shadow = (
            _flags(
                ("--prompt", path(candidate.prompt)),
                ("--sampling", candidate.sampling or None),
                ("--engine", candidate.engine),
                ("--forget-s", forget),
            )
            if has_candidate
            else narrator
        )
    return narrator, shadow


def cmd_launch(args: argparse.Namespace) -> int:
    from .instance import InstanceLock
    from .supervisor import Supervisor, default_specs

    settings: Settings = args.settings
    data = DataDir.at(settings.data_dir)
    data.ensure()
    ensure_keys(data.keys)
    _child_environment(settings, corpus_flag="corpus" in args.settings_from_flags)
    from .broker import check_bind

    for endpoint in (settings.bind, settings.engine_bind):
        if endpoint:
            check_bind(endpoint, settings.allow_remote)
    broker_args, engine_args, controller_args = child_flags(settings)
    candidate_engine_args = candidate_engine_flags(settings)
    if candidate_engine_args is not None:  # the candidate voice speaks through it
        settings = settings.model_copy(update={"candidate_engine": data.ipc("engine-candidate")})
    narrator_args, shadow_args = narrator_flags(settings)

    exit_code = [0]

    async def _talk(args: argparse.Namespace, data: DataDir) -> None:
        """The user's seat: one answer (--ask), a chat (a terminal), or just wait."""
        from .chat import ask, terminal_chat
        from .embed import connect

        if args.ask:
            async with connect(data.root) as conn:
                exit_code[0] = await ask(conn, args.ask)
        elif sys.stdin.isatty():
            async with connect(data.root) as conn:
                await terminal_chat(conn)
        else:
            await anyio.sleep_forever()

    def ready(name: str, pid: int, seconds: float) -> None:
        print(f"  ready  {name:<16} pid {pid:<8} {seconds:5.1f} s", flush=True)

    async def launch() -> None:
        specs = default_specs(
            data,
            debug=settings.debug,
            engine=settings.engine,
            broker_args=broker_args,
            engine_args=engine_args,
            controller_args=controller_args,
            narrator_args=narrator_args,
            shadow_args=shadow_args,
            candidate_engine_args=candidate_engine_args,
            engine_endpoint=settings.engine_bind,
        )
        supervisor = Supervisor(data, specs, on_ready=ready if not args.ask else None)
        gateway = None
        if args.serve:  # in this process, beside the supervisor: one Ctrl-C stops both
            from .gateway import GatewayServer

            gateway = GatewayServer.from_settings(settings, data)
            gateway.listen()  # a taken port fails now, before any child starts
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                started = time.monotonic()
                await tg.start(supervisor.run)
                if not args.ask:
                    print(
                        f"Chorus is up in {time.monotonic() - started:.1f} s (data: {data.root}). "
                        "Watch the bus with `python -m runtime tail`; Ctrl-C stops.",
                        flush=True,
                    )
                if gateway is not None:
                    await tg.start(gateway.run)

                async def wait_for_signal() -> None:
                    async for _ in signals:
                        print("stopping…", file=sys.stderr, flush=True)
                        break
                    talk.cancel()

                with anyio.CancelScope() as talk:
                    tg.start_soon(wait_for_signal)
                    await _talk(args, data)
                if gateway is not None:
                    await gateway.stop()
                await supervisor.stop()
                tg.cancel_scope.cancel()

    with InstanceLock(data):
        anyio.run(launch)
    if not args.ask:
        print("stopped.", flush=True)
    return exit_code[0]


def cmd_serve(args: argparse.Namespace) -> int:
    from .gateway import GatewayServer

    data = DataDir.at(args.settings.data_dir)
    data.ensure()
    server = GatewayServer.from_settings(args.settings, data)

    async def serve() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                await tg.start(server.run)
                async for _ in signals:
                    break
                await server.stop()
                tg.cancel_scope.cancel()

    anyio.run(serve)
    return 0


def _endpoints_and_keys(target: Path, keys: Path | None) -> tuple[Endpoints, Path]:
    """``--connect``: a data dir, or an endpoints.json (keys beside it or from --keys)."""
    if target.is_dir():
        data = DataDir(target)
        return data.wait_for_endpoints(), keys or data.keys
    try:
        endpoints = msgspec.json.decode(target.read_bytes(), type=Endpoints)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"cannot read endpoints from {target}: {exc}") from exc
    return endpoints, keys or target.parent.parent / "keys"


def _load_agent(name: str, impl: str | None) -> Any:
    from .supervisor import DEFAULT_AGENTS

    spec = impl or DEFAULT_AGENTS.get(name)
    if spec is None:
        raise ConfigError(f"no built-in agent named {name!r}; pass --impl module:Class")
    module_name, _, cls_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load agent {spec!r}: {exc}") from exc
    agent = cls()
    agent.name = name
    return agent


def cmd_agent(args: argparse.Namespace) -> int:
    from agents.runtime import AgentHost

    from .bus import Bus

    endpoints, key_dir = _endpoints_and_keys(args.connect, args.keys)
    agent = _load_agent(args.name, args.impl)

    async def run() -> None:
        async with Bus(args.name, endpoints, key_dir) as bus:
            await AgentHost(agent, bus).run()

    anyio.run(run)
    return 0


def _connect_data(args: argparse.Namespace) -> tuple[Endpoints, Path]:
    data = DataDir.at(args.data_dir)
    try:
        return data.read_endpoints(), data.keys
    except FileNotFoundError:
        raise NotRunning(
            f"no Chorus runs against {data.root}; start one with `python -m runtime launch`"
        ) from None


def format_envelope(envelope: m.Envelope) -> str:
    """One readable line for a person."""
    stamp = (
        time.strftime("%H:%M:%S", time.localtime(envelope.ts))
        + f".{int(envelope.ts * 1000) % 1000:03d}"
    )
    fields = msgspec.structs.asdict(envelope.body)
    body = " ".join(f"{k}={v!r}" for k, v in fields.items() if v not in ("", None, [], {}))
    conv = f" [{envelope.conversation[:8]}]" if envelope.conversation else ""
    return f"{stamp} {envelope.topic:<22} {envelope.sender:<12}{conv} {type(envelope.body).__name__} {body}"


def cmd_tail(args: argparse.Namespace) -> int:
    from .bus import Bus

    endpoints, key_dir = _connect_data(args)

    async def run() -> None:
        async with Bus("monitor", endpoints, key_dir) as bus:
            subs = [bus.subscribe(p) for p in (args.prefixes or [""])]
            send, recv = anyio.create_memory_object_stream[m.Envelope](1000)

            async def pump(sub: Any) -> None:
                async for env in sub:
                    await send.send(env)

            async with anyio.create_task_group() as tg:
                for s in subs:
                    tg.start_soon(pump, s)
                async for env in recv:
                    line = msgspec.json.encode(env).decode() if args.json else format_envelope(env)
                    print(line, flush=True)

    try:
        anyio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .bus import Bus

    endpoints, key_dir = _connect_data(args)
    changes = []
    for pair in args.pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, got {pair!r}")
        changes.append(m.ConfigChange(key=key, value=value))

    async def run() -> None:
        async with Bus("operator", endpoints, key_dir) as bus:
            for change in changes:
                await bus.publish("sys.config", change)
                print(f"set {change.key}={change.value}")
            await anyio.sleep(0.2)  # let the messages leave before the socket closes

    anyio.run(run)
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    if args.env_example:
        print(env_example(), end="")
        return 0
    source = f"env file {args.env_file}" if args.env_file else "no env file"
    print(f"# flags > CHORUS_* environment > {source} > defaults")
    for name, value in args.settings.as_env().items():
        print(f"{name}={value}")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    if args.write:
        for name in schemas.write():
            print(f"wrote data/schemas/{name}")
        return 0
    stale = schemas.drift()
    if stale:
        print("schemas differ from the code: " + ", ".join(stale) + " (run `make schemas`)")
        return 1
    print("schemas match the code")
    return 0
