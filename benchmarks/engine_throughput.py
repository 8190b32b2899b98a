"""Decode throughput through the engine's socket, against ``transformers`` ``generate``.

The engine runs as users get it: ``python -m engine serve --data-dir TMP`` in its own
process (default model, SmolLM2-135M-Instruct, fp32 on the CPU, ``OMP_NUM_THREADS`` =
``--threads``), reached with ``engine.Client`` over its CURVE ``ipc://`` socket. The
baseline is ``LlamaForCausalLM.generate`` (greedy, its default ``DynamicCache``) in this
process, on the same weights (the fp32 directory ``engine.weights`` converted the GGUF
into) with ``torch.set_num_threads(--threads)``.

- Single session: the same prompt (a slice of Python's docs, ~200 tokens, plain text:
  both get the same token ids) decoded greedily, engine and ``generate`` back to back,
  their order swapped every round, ``--rounds`` rounds; the medians count. Only decode is
  timed: from the first generated token to the last (prefill and the first token are
  left out on both sides), over the tokens actually generated (``generate`` gets
  ``min_new_tokens`` so it never stops early; the engine's sampler stops at EOS, so its
  own count is used). ``ratio`` = engine ÷ ``generate`` tokens/s (target ≥ 1.5).
  ``cpu_ratio`` compares the CPU time each spends per token over the same stretch (the
  engine process's, socket work included; the generating thread's for ``generate``),
  which other work on the machine disturbs less than wall time.
- Aggregate: 1, 4 and 8 sessions, each with its own prompt appended first, then all
  generating at once over one client; tokens/s = every token after each session's first
  ÷ the time from the first token of any session to the last (target: 8 sessions ≥ 2×
  one session, ``aggregate_ratio_8_1``).
- The bound: memory bandwidth (the median of 5 numpy copies of a 256 MiB array, bytes
  read + written per second, one thread) ÷ the bytes of weights a decode step reads (every
  parameter once; the tied embedding counted once, as the LM head it is read as; the
  embedding lookup reads one row), and the engine's tokens/s as a fraction of it. The KV
  cache read per step (~46 KB per cached token, ~4% at 500 tokens) is left out.

Run (from the repository root)::

    .venv/bin/python -m benchmarks.engine_throughput           # 256 tokens × 3 rounds
    .venv/bin/python -m benchmarks.engine_throughput --quick   # 64 tokens × 2 rounds
    .venv/bin/python -m benchmarks.engine_throughput --device cuda

``--device cuda`` runs both sides on the GPU in bf16 (the engine's CUDA default; the
baseline's weights cast the same way), takes the bound from a device-to-device copy with
torch, and writes ``engine_throughput_cuda.json`` and ``.png`` instead.

``--tokens`` scales the single-session length (the aggregate runs half as many per
session). Writes ``benchmarks/results/engine_throughput.json`` and ``.png`` (``--quick``:
``benchmarks/results/quick/``).

Wall time on the 2-core development VM (AMD EPYC, one torch thread): the recorded full
run took 4 min 8 s at load average ~2; ``--quick`` 57 s. At load 8 an earlier full run
gave engine ÷ ``generate`` = 0.80, with the two sides' rates moving by 1.5× between
rounds: compare runs on a quiet machine, or by ``cpu_ratio``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import psutil
import torch

from engine.client import Client, EngineUnavailable
from engine.sampling import SamplingParams
from runtime.keys import ensure_keys
from runtime.paths import DataDir

from ._common import save_plot, write_json
from .engine_perplexity import machine, pydoc_tokens

if TYPE_CHECKING:
    from collections.abc import Iterator

    from matplotlib.figure import Figure
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

    from engine.model import Model

SESSION_COUNTS = (1, 4, 8)
PROMPT_TOKENS = 200
IDENTITY = "controller"
START_TIMEOUT_S = 300.0
TARGET_RATIO = 1.5
TARGET_AGGREGATE_RATIO = 2.0
COPY_MIB = 256


@dataclass
class Decode:
    """One timed stretch of decoding: tokens after the first, and the seconds they took."""

    tokens: int
    seconds: float
    first: float  # perf_counter of the first generated token
    last: float
    cpu_s: float = float("nan")  # CPU time of the process doing the decoding, same stretch

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_ms_per_token(self) -> float:
        return self.cpu_s / self.tokens * 1e3 if self.tokens else float("nan")


# -- the engine, through its socket ---------------------------------------------------------


@contextmanager
def engine_process(threads: int, device: str) -> Iterator[tuple[DataDir, psutil.Process]]:
    """``python -m engine serve`` on a fresh data dir, until the block ends."""
    root = Path(tempfile.mkdtemp(prefix="chorus-bench-engine-"))
    data = DataDir(root)
    data.ensure()
    ensure_keys(data.keys)  # before the server starts, so the client never races it
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_path = root / "engine.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--data-dir", str(root), "--device", device],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield data, psutil.Process(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        if server.returncode not in (0, -15):
            print(log_path.read_text()[-2000:], file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


async def wait_ready(data: DataDir) -> None:
    """Ask for ``stats`` until the engine answers (it loads the model first)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            async with Client.connect(IDENTITY, data.root, timeout=5) as llm:
                await llm.stats()
                return
        except EngineUnavailable:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the engine did not answer within {START_TIMEOUT_S:.0f} s"
                ) from None


async def engine_decode(
    llm: Client, server: psutil.Process, session: str, prompt: str, max_tokens: int
) -> Decode:
    """Open a session, append the prompt (prefilled before ``generate``), decode greedily.

    ``cpu_s``: the engine process's CPU time over the whole ``generate`` (every decode
    step, plus one sampling step that needs no forward, and the socket work).
    """
    await llm.open(session)
    await llm.append(session, prompt)
    stamps: list[tuple[float, int]] = []
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    cpu0 = sum(server.cpu_times()[:2])
    async for chunk in llm.generate(session, params):
        stamps.append((time.perf_counter(), chunk.tokens))
    cpu = sum(server.cpu_times()[:2]) - cpu0
    (first, n0), (last, n1) = stamps[0], stamps[-1]
    return Decode(n1 - n0, last - first, first, last, cpu)


async def engine_aggregate(
    llm: Client, prompts: list[str], max_tokens: int, tag: str
) -> dict[str, Any]:
    """All sessions prefilled, then generating at once; aggregate decode tokens/s."""
    names = [f"{tag}-{i}" for i in range(len(prompts))]
    for name, prompt in zip(names, prompts, strict=True):
        await llm.open(name)
        await llm.append(name, prompt)
    runs: list[Decode] = []

    async def one(name: str) -> None:
        stamps: list[tuple[float, int]] = []
        async for chunk in llm.generate(name, SamplingParams(temperature=0, max_tokens=max_tokens)):
            stamps.append((time.perf_counter(), chunk.tokens))
        (first, n0), (last, n1) = stamps[0], stamps[-1]
        runs.append(Decode(n1 - n0, last - first, first, last))

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(one, name)
    for name in names:
        await llm.close(name)
    span = max(r.last for r in runs) - min(r.first for r in runs)
    tokens = sum(r.tokens for r in runs)
    return {"tok_s": tokens / span, "tokens": tokens, "seconds": span}


# -- the baseline, in this process ------------------------------------------------------------


def load_hf(device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """The same weights as a transformers model, from the converted cache directory."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from engine.weights import convert_gguf, default_model_path

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    directory = convert_gguf(default_model_path())  # returns the cached directory
    hf: LlamaForCausalLM = LlamaForCausalLM.from_pretrained(str(directory), dtype=dtype)
    hf.to(device)  # type: ignore[arg-type]
    hf.eval()  # type: ignore[no-untyped-call]
    return hf


def hf_decode(hf: LlamaForCausalLM, ids: list[int], new_tokens: int) -> Decode:
    """Greedy ``generate`` of exactly ``new_tokens``; decode timed from the first new token."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):  # type: ignore[misc]
        """Records when each new token comes out (the first ``put`` is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []  # generate runs on this thread, with one torch thread

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())
            self.cpu.append(time.thread_time())

        def end(self) -> None:
            pass

    stamps = Stamps()
    prompt = torch.tensor([ids], device=hf.device)
    with torch.inference_mode():
        hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=stamps,
            pad_token_id=hf.config.eos_token_id,
        )
    times, cpu = stamps.times[1:], stamps.cpu[1:]  # drop the prompt
    return Decode(len(times) - 1, times[-1] - times[0], times[0], times[-1], cpu[-1] - cpu[0])


# -- the bound ---------------------------------------------------------------------------------


def copy_bandwidth_gb_s(device: str, repeats: int = 5) -> float:
    """Median GB/s (read + written) of copying a large array: numpy on one CPU thread, or
    torch device to device on a GPU."""
    if device != "cpu":
        return gpu_copy_bandwidth_gb_s(device, repeats)
    source = np.ones(COPY_MIB * 2**20 // 8)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault both in before timing
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(target, source)
        rates.append(2 * source.nbytes / (time.perf_counter() - t0) / 1e9)
    return float(np.median(rates))


def gpu_copy_bandwidth_gb_s(device: str, repeats: int) -> float:
    """Median GB/s (read + written) of a device-to-device copy of 1 GiB, timed with events."""
    source = torch.ones(2**30 // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    rates = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        rates.append(2 * source.nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    return float(np.median(rates))


def weight_bytes(model: Model) -> int:
    """Bytes of every distinct weight tensor a decode step reads (tied tensors once)."""
    tensors = [model.lm_head]  # the norms' weights are folded into the matmuls
    for layer in model.layers:
        tensors += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    distinct = {t.data_ptr(): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in distinct.values())


# -- the run -----------------------------------------------------------------------------------


def prompt_texts(tokenizer: PreTrainedTokenizerBase, count: int) -> list[str]:
    """``count`` different slices of Python's docs, ~``PROMPT_TOKENS`` tokens each."""
    ids = pydoc_tokens(tokenizer, (count + 1) * 4 * PROMPT_TOKENS)
    step = 4 * PROMPT_TOKENS  # apart, so the sessions do not share text
    texts = []
    for i in range(count):
        text = tokenizer.decode(ids[i * step : i * step + PROMPT_TOKENS])
        assert isinstance(text, str)  # a flat id list decodes to one string
        texts.append(text)
    return texts


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids the engine feeds for a first ``append(text)`` (``Templates.text``)."""
    ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    return [bos, *ids] if adds_bos else ids


async def measure(
    data: DataDir,
    server: psutil.Process,
    hf: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    new_tokens: int,
    rounds: int,
    aggregate_rounds: int,
) -> dict[str, Any]:
    """Warm up both, then the single-session rounds, then the aggregate rounds."""
    prompts = prompt_texts(tokenizer, max(SESSION_COUNTS))
    ids = prompt_ids(tokenizer, prompts[0])
    singles: dict[str, list[Decode]] = {"engine": [], "hf_generate": []}
    aggregate: dict[int, list[dict[str, Any]]] = {n: [] for n in SESSION_COUNTS}
    async with Client.connect(IDENTITY, data.root, timeout=120) as llm:
        await engine_decode(llm, server, "warm", prompts[0], 16)
        await anyio.to_thread.run_sync(hf_decode, hf, ids, 8)
        for r in range(rounds):
            for side in ("engine", "hf_generate") if r % 2 == 0 else ("hf_generate", "engine"):
                if side == "engine":
                    run = await engine_decode(llm, server, "single", prompts[0], new_tokens)
                else:
                    run = await anyio.to_thread.run_sync(hf_decode, hf, ids, new_tokens)
                singles[side].append(run)
                print(
                    f"round {r + 1} {side:<12} {run.tokens:>4} tokens {run.tok_s:7.2f} tok/s",
                    flush=True,
                )
        for r in range(aggregate_rounds):
            for n in SESSION_COUNTS:
                agg = await engine_aggregate(llm, prompts[:n], new_tokens // 2, f"agg{n}")
                aggregate[n].append(agg)
                print(
                    f"round {r + 1} {n} sessions: {agg['tok_s']:7.2f} tok/s aggregate", flush=True
                )
    return {
        "singles": {
            k: [asdict(d) | {"tok_s": d.tok_s, "cpu_ms_per_token": d.cpu_ms_per_token} for d in v]
            for k, v in singles.items()
        },
        "aggregate": {str(n): v for n, v in aggregate.items()},
        "prompt_tokens": len(ids),
    }


def median_tok_s(runs: list[dict[str, Any]]) -> float:
    """Median tokens/s of a list of runs."""
    return round(float(np.median([r["tok_s"] for r in runs])), 2)


def plot(result: dict[str, Any], title: str) -> Figure:
    """Single-session tokens/s (engine, generate, the bandwidth bound) and the aggregate."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8))
    single, aggregate = fig.subplots(1, 2)
    labels = ["engine\n(socket)", "transformers\ngenerate", "bandwidth\nbound"]
    values = [result["engine_tok_s"], result["hf_generate_tok_s"], result["bandwidth_bound_tok_s"]]
    drawn = single.bar(labels, values, color=["C0", "C1", "grey"])
    single.bar_label(drawn, labels=[f"{v:.1f}" for v in values])
    runs = result["runs"]["singles"]
    for i, side in enumerate(("engine", "hf_generate")):
        points = [r["tok_s"] for r in runs[side]]
        single.plot([i] * len(points), points, "k.", label="rounds" if i == 0 else None)
    single.set_ylabel("decode tokens / s, one session")
    single.set_title(f"engine ÷ generate = {result['ratio']:.2f}")
    single.legend()
    counts = list(result["aggregate_tok_s"])
    values = list(result["aggregate_tok_s"].values())
    drawn = aggregate.bar([f"{n} session{'s' if n != '1' else ''}" for n in counts], values)
    aggregate.bar_label(drawn, labels=[f"{v:.1f}" for v in values])
    aggregate.set_ylabel("aggregate decode tokens / s")
    aggregate.set_title(f"8 ÷ 1 sessions = {result['aggregate_ratio_8_1']:.2f}")
    fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Measure, print, write ``engine_throughput.json`` and ``.png``."""
    parser = argparse.ArgumentParser(description="Engine decode throughput vs transformers.")
    parser.add_argument("--quick", action="store_true", help="64 tokens, 2 rounds (~4 min)")
    parser.add_argument("--tokens", type=int, help="tokens per single run (default 256; quick 64)")
    parser.add_argument("--rounds", type=int, help="single-session rounds (default 3; quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (1)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run (cpu)"
    )
    args = parser.parse_args(argv)
    name = "engine_throughput" if args.device == "cpu" else f"engine_throughput_{args.device}"
    new_tokens = args.tokens or (64 if args.quick else 256)
    rounds = args.rounds or (2 if args.quick else 3)
    aggregate_rounds = 1 if args.quick else 2
    torch.set_num_threads(args.threads)
    from engine.weights import load_model

    started = time.perf_counter()
    model, tokenizer = load_model(device=args.device)
    dtype = model.dtype  # the engine's own choice: exact fp32 on the CPU, bf16 on CUDA
    precision = "fp32" if dtype == torch.float32 else "bf16"
    weights = weight_bytes(model)
    del model
    hf = load_hf(args.device, dtype)
    bandwidth = copy_bandwidth_gb_s(args.device)
    with engine_process(args.threads, args.device) as (data, server):
        anyio.run(wait_ready, data)
        runs = anyio.run(measure, data, server, hf, tokenizer, new_tokens, rounds, aggregate_rounds)
    wall_s = round(time.perf_counter() - started, 1)
    engine_tok_s = median_tok_s(runs["singles"]["engine"])
    hf_tok_s = median_tok_s(runs["singles"]["hf_generate"])
    aggregate = {n: median_tok_s(v) for n, v in runs["aggregate"].items()}
    bound = bandwidth * 1e9 / weights
    ratio = round(engine_tok_s / hf_tok_s, 3)
    engine_cpu = float(np.median([r["cpu_ms_per_token"] for r in runs["singles"]["engine"]]))
    hf_cpu = float(np.median([r["cpu_ms_per_token"] for r in runs["singles"]["hf_generate"]]))
    aggregate_ratio = round(aggregate["8"] / aggregate["1"], 3)
    result = {
        "engine_tok_s": engine_tok_s,
        "hf_generate_tok_s": hf_tok_s,
        "ratio": ratio,
        "engine_cpu_ms_per_token": round(engine_cpu, 2),
        "hf_generate_cpu_ms_per_token": round(hf_cpu, 2),
        "cpu_ratio": round(hf_cpu / engine_cpu, 3),
        "aggregate_tok_s": aggregate,
        "aggregate_ratio_8_1": aggregate_ratio,
        "bandwidth_bound_tok_s": round(bound, 2),
        "fraction_of_bound": round(engine_tok_s / bound, 3),
        "bandwidth_gb_s": round(bandwidth, 2),
        "weight_bytes": weights,
        "targets": {"ratio_min": TARGET_RATIO, "aggregate_ratio_8_1_min": TARGET_AGGREGATE_RATIO},
        "ratio_met": ratio >= TARGET_RATIO,
        "aggregate_met": aggregate_ratio >= TARGET_AGGREGATE_RATIO,
        "new_tokens": new_tokens,
        "aggregate_new_tokens_per_session": new_tokens // 2,
        "prompt_tokens": runs["prompt_tokens"],
        "rounds": rounds,
        "aggregate_rounds": aggregate_rounds,
        "model": f"SmolLM2-135M-Instruct ({precision}, {args.device.upper()}), greedy",
        "device": args.device,
        "quick": args.quick,
        "wall_s": wall_s,
        "machine": machine(args.threads)
        | ({"gpu": torch.cuda.get_device_name()} if args.device == "cuda" else {}),
        "runs": runs,
    }
    print(f"\n{'':<22}{'tok/s':>8}{'CPU ms/token':>14}")
    print(f"{'engine (socket)':<22}{engine_tok_s:>8.2f}{engine_cpu:>14.1f}")
    print(f"{'transformers generate':<22}{hf_tok_s:>8.2f}{hf_cpu:>14.1f}")
    print(f"{'bandwidth bound':<22}{bound:>8.2f}   ({bandwidth:.1f} GB/s ÷ {weights / 1e6:.0f} MB)")
    for n, v in aggregate.items():
        print(f"{f'aggregate, {n} sessions':<22}{v:>8.2f}")
    print(
        f"\nengine ÷ generate = {ratio:.2f} (target ≥ {TARGET_RATIO}: "
        f"{'met' if result['ratio_met'] else 'MISSED'}); 8 ÷ 1 sessions = {aggregate_ratio:.2f} "
        f"(target ≥ {TARGET_AGGREGATE_RATIO}: {'met' if result['aggregate_met'] else 'MISSED'}); "
        f"engine at {result['fraction_of_bound']:.0%} of the bandwidth bound; on CPU time "
        f"per token engine ÷ generate = {result['cpu_ratio']:.2f}"
    )
    json_path = write_json(name, result, quick=args.quick)
    where = f"{args.threads} thread(s)" if args.device == "cpu" else torch.cuda.get_device_name()
    title = (
        f"decode throughput ({'quick, ' if args.quick else ''}SmolLM2-135M {precision}, {where})"
    )
    png_path = save_plot(plot(result, title), name, quick=args.quick)
    print(f"\nwrote {json_path} and {png_path} in {wall_s} s")


if __name__ == "__main__":
    main()
