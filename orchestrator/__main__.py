"""``python -m orchestrator controller|narrator``: the two orchestrating processes
(``narrator --shadow`` is the shadow narrator, ``narrator-shadow``);
``python -m orchestrator summarize [--conversation C]``: bring rolling summaries up to date
by hand (with the engine when one runs, extractive otherwise)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

from engine.client import Client
from runtime import logconfig
from runtime.bus import Bus
from runtime.errors import ChorusError, ConfigError
from runtime.lifeline import die_with_parent
from runtime.paths import DataDir

from .canary import Policy, Voice
from .gating import GateConfig
from .narrator import FORGET_S
from .process import until_signalled

ENGINE_TIMEOUT_S = 60.0


async def serve(
    role: str, data: DataDir, gate: GateConfig, args: argparse.Namespace | None = None
) -> None:
    """Run ``role`` until SIGTERM/SIGINT; ``args`` carries the narrator's voice options."""
    shadow = role == "narrator" and args is not None and args.shadow
    identity = "narrator-shadow" if shadow else role
    endpoints = data.read_endpoints()
    async with AsyncExitStack() as stack:
        bus = await stack.enter_async_context(Bus(identity, endpoints, data.keys))
        engine = None
        own_engine = args.engine if role == "narrator" and args is not None else None
        endpoint = own_engine or endpoints.engine
        if endpoint is not None:
            engine = await stack.enter_async_context(
                Client(identity, endpoint, data.keys, timeout=ENGINE_TIMEOUT_S)
            )
        if role == "controller":
            from .controller import Controller
            from .gating import Gate

            worker = Controller(bus, data, engine, gate=Gate(time.monotonic, gate)).run
        else:
            from .narrator import Narrator

            if engine is None:
                # with no engine the narrator can still speak acks and playbooks
                engine = await stack.enter_async_context(
                    Client(identity, data.ipc("engine"), data.keys, timeout=2)
                )
            assert args is not None
            voice, candidate, policy = voices(args)
            candidate_engine = None
            if candidate is not None and not shadow:
                # its own client, so its timeout is the canary's (its sessions are named apart)
                served = candidate.engine or endpoint
                candidate_engine = await stack.enter_async_context(
                    Client(
                        identity,
                        served or data.ipc("engine"),
                        data.keys,
                        timeout=args.canary_timeout_s if served else 2,  # as the baseline's
                    )
                )
            worker = Narrator(
                bus,
                data,
                engine,
                voice=voice,
                candidate=candidate,
                candidate_engine=candidate_engine,
                policy=policy,
                shadow=shadow,
                forget_s=args.forget_s,
            ).run
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            await until_signalled()
            tg.cancel_scope.cancel()


async def summarize_now(data: DataDir, conversations: list[str]) -> None:
    from .log import summarize
    from .tokens import TokenCounter

    async with AsyncExitStack() as stack:
        engine: Client | None = None
        try:
            endpoint = data.read_endpoints().engine
        except FileNotFoundError:
            endpoint = None
        if endpoint is not None:
            engine = await stack.enter_async_context(
                Client("operator", endpoint, data.keys, timeout=30)
            )
            try:
                await engine.stats()
            except ChorusError as exc:
                print(f"engine not answering ({exc}): extractive summaries", file=sys.stderr)
                engine = None
        count = await TokenCounter.from_engine(engine)
        for conversation in conversations or summarize.conversations(data.logs):
            done = await summarize.update(data, conversation, engine, count)
            md, _ = summarize.paths(data, conversation)
            state = f"{done.method}, {done.turns} turns" if done else "already up to date"
            print(f"{conversation}: {state} -> {md}")


def voices(args: argparse.Namespace) -> tuple[Voice, Voice | None, Policy]:
    """The narrator's voice, its canary candidate (None without one) and the canary's
    policy, from the command line; raises ConfigError on a bad prompt or sampling."""
    voice = Voice(args.prompt, args.sampling or "", args.engine)
    voice.check("--prompt/--sampling")
    candidate = None
    if args.candidate_prompt or args.candidate_sampling or args.candidate_engine:
        candidate = Voice(
            args.candidate_prompt, args.candidate_sampling or "", args.candidate_engine
        )
        candidate.check("--candidate-prompt/--candidate-sampling")
    try:
        policy = Policy(
            percent=args.canary_percent,
            min_samples=args.canary_min_samples,
            max_error_delta=args.canary_max_error_delta,
            max_latency_ratio=args.canary_max_latency_ratio,
        )
    except ValueError as exc:
        raise ConfigError(f"canary: {exc}") from None
    return voice, candidate, policy


def add_narrator_arguments(parser: argparse.ArgumentParser) -> None:
    """The narrator's voice, its candidate and the canary (``docs/rollout.md``)."""
    policy = Policy()
    n = parser.add_argument_group("narrator (docs/rollout.md)")
    n.add_argument("--shadow", action="store_true", help="serve as narrator-shadow")
    n.add_argument("--prompt", type=Path, help="system prompt file (default prompts/narrator.md)")
    n.add_argument("--sampling", help="sampling overrides, e.g. temperature=0.5,max_tokens=128")
    n.add_argument("--engine", metavar="ENDPOINT", help="another engine for this voice")
    n.add_argument("--candidate-prompt", type=Path, help="the canary candidate's prompt file")
    n.add_argument("--candidate-sampling", help="the candidate's sampling overrides")
    n.add_argument("--candidate-engine", metavar="ENDPOINT", help="the candidate's engine")
    for flag, value, what in (
        ("--canary-percent", policy.percent, "share of conversations on the candidate"),
        ("--canary-min-samples", policy.min_samples, "utterances per voice before judging"),
        ("--canary-max-error-delta", policy.max_error_delta, "error rate over the baseline's"),
        ("--canary-max-latency-ratio", policy.max_latency_ratio, "first-token time ratio"),
        ("--canary-timeout-s", ENGINE_TIMEOUT_S, "the candidate's engine answers within"),
        ("--forget-s", FORGET_S, "a conversation quiet this long is forgotten"),
    ):
        n.add_argument(flag, type=type(value), default=value, help=f"{what} (default {value:g})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator")
    parser.add_argument("role", choices=["controller", "narrator", "summarize"])
    parser.add_argument(
        "--conversation", action="append", default=[], help="summarize: only these (repeatable)"
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    defaults = GateConfig()
    for flag, value, what in (
        ("--min-gap-s", defaults.min_gap_s, "seconds between two progress updates"),
        ("--idle-s", defaults.idle_s, "silence while tasks run before a progress update"),
        ("--coalesce-s", defaults.coalesce_s, "events this close are told together"),
    ):
        parser.add_argument(flag, type=float, default=value, help=f"controller: {what}")
    add_narrator_arguments(parser)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--log-json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent()
    args = build_parser().parse_args(argv)
    data = DataDir.at(args.data_dir)
    logconfig.configure(
        "narrator-shadow" if args.role == "narrator" and args.shadow else args.role,
        log_dir=data.process_logs if args.log_json else None,
        debug=args.debug,
        console=False if args.log_json else None,
    )
    try:
        if args.role == "summarize":
            anyio.run(summarize_now, data, args.conversation)
            return 0
        if args.role == "narrator":
            voices(args)  # a bad prompt or sampling fails here, before the bus is joined
        data.wait_for_endpoints()
        gate = GateConfig(min_gap_s=args.min_gap_s, idle_s=args.idle_s, coalesce_s=args.coalesce_s)
        anyio.run(serve, args.role, data, gate, args)
    except ChorusError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
