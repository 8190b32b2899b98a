"""``python -m engine serve`` (the engine process) and ``python -m engine chat``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog

from runtime import logconfig
from runtime.errors import ChorusError, ConfigError
from runtime.keys import ensure_keys
from runtime.lifeline import die_with_parent
from runtime.paths import DataDir

log = structlog.get_logger("engine")

STATS_EVERY_S = 2.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine", description="The Chorus StreamingLLM engine."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, helptext in (
        ("serve", "serve the model to the other processes"),
        ("chat", "an endless streaming chat in this terminal"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="data directory (default: $CHORUS_DATA_DIR or ./data)",
        )
        p.add_argument(
            "--model",
            default=None,
            help="a local Hugging Face directory or .gguf file (default: SmolLM2-135M-Instruct)",
        )
        p.add_argument(
            "--device", default=None, help="cuda, mps or cpu (default: the best available)"
        )
        p.add_argument("--sink", type=int, default=4, help="attention sink tokens (default 4)")
        if name == "serve":
            p.add_argument(
                "--name",
                default="engine",
                choices=["engine", "engine-candidate"],
                help="engine-candidate: the second engine, serving a canary's candidate model "
                "on its own socket (default engine)",
            )
            p.add_argument(
                "--bind",
                help="tcp://HOST:PORT, for workers on other hosts (default: an ipc socket "
                "under data/run); name it to the broker with --engine-endpoint",
            )
            p.add_argument(
                "--allow-remote",
                action="store_true",
                help="let --bind take a non-loopback address",
            )
        p.add_argument(
            "--window", type=int, default=1020, help="rolling window tokens (default 1020)"
        )
        p.add_argument(
            "--idle-s",
            type=float,
            default=900.0,
            help="evict sessions idle this long (default 900 s)",
        )
        p.add_argument(
            "--threads",
            type=int,
            default=None,
            help="CPU threads for the model's math (default: one per core but one, so the "
            "other processes keep a core; OMP_NUM_THREADS, if set, decides instead)",
        )
        p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
        p.add_argument(
            "--log-json", action="store_true", help="log JSON lines to data/logs/process/"
        )
    return parser


def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    import torch

    from engine.weights import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads needs a positive count, not {args.threads}")
        torch.set_num_threads(args.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Measured on the 2-core box (benchmarks/engine_throughput.py --threads 2): with
        # the engine's threads on every core, the other processes preempt one of them
        # and every matmul waits for it; decode fell to 0.56x of the 1-thread rate.
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    started = time.monotonic()
    model, tokenizer = load_model(args.model, device=args.device)
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    log.info(
        "model_loaded",
        model=name,
        device=str(model.device),
        threads=torch.get_num_threads(),
        seconds=round(time.monotonic() - started, 1),
    )
    return model, tokenizer, name


def _server(args: argparse.Namespace, data: DataDir, endpoint: str) -> Any:
    from engine.server import EngineConfig, EngineServer

    model, tokenizer, name = _load(args)
    config = EngineConfig(sink=args.sink, window=args.window, idle_s=args.idle_s)
    return EngineServer(model, tokenizer, endpoint, data.keys, config, model_name=name)


def _publish_stats(server: Any, data: DataDir, name: str) -> None:
    """``engine.stats`` on the bus every 2 s, from a thread of its own (the model loop
    never waits for the bus). Without a broker (a standalone engine) it keeps waiting."""
    from runtime import messages as m
    from runtime.bus import Bus

    async def run() -> None:
        while not data.endpoints_file.exists():
            if server._stop.is_set():
                return
            await anyio.sleep(0.5)
        async with Bus("engine", data.read_endpoints(), data.keys) as bus:
            while not server._stop.is_set():
                s = server.snapshot
                body = m.EngineStats(
                    tokens_per_s=s.tokens_per_s,
                    sessions=s.sessions,
                    active_requests=s.active_requests,
                    cache_fill=s.cache_fill,
                    device=s.device,
                    resident_mb=s.resident_mb,
                    name=name,
                )
                await bus.publish("engine.stats", body)
                await anyio.sleep(STATS_EVERY_S)

    try:
        anyio.run(run)
    except Exception as exc:  # statistics are optional; serving is not
        log.warning("stats_publisher_stopped", error=str(exc))


def cmd_serve(args: argparse.Namespace) -> int:
    data = DataDir.at(args.data_dir)
    data.ensure()
    ensure_keys(data.keys)
    if args.bind:
        from runtime.broker import check_bind

        check_bind(args.bind, args.allow_remote)
    server = _server(args, data, args.bind or data.ipc(args.name))
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    stats = threading.Thread(
        target=_publish_stats, args=(server, data, args.name), name="engine-stats", daemon=True
    )
    stats.start()
    server.serve()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from engine.client import Client
    from engine.protocol import Message
    from engine.sampling import SamplingParams

    tmp = tempfile.TemporaryDirectory(prefix="chorus-chat-")
    data = DataDir(Path(tmp.name))
    data.ensure()
    ensure_keys(data.keys, ("engine", "operator"))
    server = _server(args, data, data.ipc("engine"))
    thread = threading.Thread(target=server.serve, name="engine", daemon=True)
    thread.start()
    server.ready.wait()

    async def chat() -> None:
        async with Client("operator", server.endpoint, data.keys) as llm:
            await llm.open("chat")
            streamed = 0
            print(
                "Endless chat with the StreamingLLM engine. Ctrl-D or /quit ends it.",
                file=sys.stderr,
            )
            while True:
                try:
                    text = await anyio.to_thread.run_sync(input, "\nyou> ")
                except EOFError:
                    return
                if text.strip() in ("/quit", "/exit"):
                    return
                await llm.append(
                    "chat", messages=[Message(role="user", content=text)], generation_prompt=True
                )
                started, count = time.monotonic(), 0
                print("bot> ", end="", flush=True)
                async for chunk in llm.generate(
                    "chat", SamplingParams(temperature=0.7, top_p=0.9, max_tokens=512)
                ):
                    print(chunk.delta, end="", flush=True)
                    count = chunk.tokens
                streamed += count
                st = await llm.stats()
                rate = count / max(time.monotonic() - started, 1e-9)
                print(
                    f"\n[{streamed} tokens streamed · {rate:.1f} tok/s · cache {st.cache_fill:.0%} of {st.sink + st.window}]",
                    file=sys.stderr,
                )

    try:
        anyio.run(chat)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        thread.join(timeout=5)
        tmp.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent()
    args = build_parser().parse_args(argv)
    data = DataDir.at(args.data_dir)
    logconfig.configure(
        getattr(args, "name", "engine"),  # engine-candidate logs apart
        log_dir=data.process_logs if args.log_json else None,
        debug=args.debug,
        console=False if args.log_json else None,
    )
    try:
        code: int = {"serve": cmd_serve, "chat": cmd_chat}[args.command](args)
        return code
    except ChorusError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
