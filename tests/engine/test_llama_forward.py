"""Our forward against transformers (dense) and against a naive StreamingLLM reference.

The reference below shares no code with engine/: it runs transformers' own modules token
by token, keeps every token's un-rotated key/value as first computed, and at each step
attends, by masking, over exactly the kept tokens (first `sink`, last `window`) with keys
and query rotated by their positions inside the cache, as in the StreamingLLM paper.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from engine import Model, SinkCache
from tests.engine.conftest import tiny_pair

TOLERANCE = 1e-3  # max abs logit difference, fp32


class NaiveStream:
    """StreamingLLM by brute force: all K/V kept, the evicted ones masked out."""

    def __init__(self, hf: LlamaForCausalLM, sink: int, window: int) -> None:
        self.hf, self.sink, self.window = hf, sink, window
        layers = hf.config.num_hidden_layers
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]  # [Hkv, D] each
        self.values: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Append one token; return its next-token logits [V]."""
        cfg, model = self.hf.config, self.hf.model
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        now = len(self.keys[0])  # stream index of this token
        kept = torch.tensor([t < self.sink or t > now - self.window for t in range(now + 1)])
        position = (kept.cumsum(0) - 1)[None]  # [1, n] rank among kept tokens = in-cache position
        x = model.embed_tokens(torch.tensor([[token]]))  # [1, 1, dim]
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, 1, heads, dim)
            key = attn.k_proj(h).view(kv_heads, dim)
            if hasattr(attn, "q_norm"):  # Qwen3: each head normalised before RoPE
                q, key = attn.q_norm(q), attn.k_norm(key)
            q = q.transpose(1, 2)  # [1, H, 1, D]
            self.keys[i].append(key)
            self.values[i].append(attn.v_proj(h).view(kv_heads, dim))
            k = torch.stack(self.keys[i], dim=1)[None]  # [1, Hkv, n, D], un-rotated
            v = torch.stack(self.values[i], dim=1)[None]
            cos, sin = model.rotary_emb(x, position)  # [1, n, D]
            k, _ = apply_rotary_pos_emb(k, k, cos, sin)
            q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
            k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(dim)  # [1, H, 1, n]
            scores = scores.masked_fill(~kept, -math.inf)
            out = torch.softmax(scores, dim=-1) @ v  # [1, H, 1, D]
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, 1, heads * dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.hf.lm_head(model.norm(x))[0, 0]


@functools.cache
def reference_logits(sink: int) -> torch.Tensor:
    """The naive reference over 100 tokens with window 16, computed once per sink. # [T, V]"""
    hf, _ = tiny_pair()
    tokens = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(sink))
    reference = NaiveStream(hf, sink=sink, window=16)
    return torch.stack([reference.step(int(t)) for t in tokens])


def dense_logits(hf: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' own full-attention forward. # [T, V]"""
    with torch.no_grad():
        logits: torch.Tensor = hf(tokens[None]).logits[0]
    return logits


def run(model: Model, cache: SinkCache, tokens: torch.Tensor, chunks: list[int] | None) -> Any:
    """Our logits for every token, one by one (chunks=None) or in prefill chunks."""
    if chunks is None:
        return torch.stack([model.decode_one_token(int(t), cache) for t in tokens])
    assert sum(chunks) == len(tokens)
    bounds = torch.tensor([0, *chunks]).cumsum(0).tolist()
    parts = [
        model.prefill(tokens[a:b], cache, chunk_size=b - a) for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(parts)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("chunks", [None, [40], [1, 3, 17, 19]])
def test_matches_dense_transformers_before_the_first_eviction(
    tiny: tuple[LlamaForCausalLM, Model], chunks: list[int] | None
) -> None:
    """While everything fits, StreamingLLM is plain causal attention: logits equal HF's."""
    hf, model = tiny
    tokens = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    ours = run(model, model.new_cache(sink=4, window=36), tokens, chunks)
    assert max_diff(ours, dense_logits(hf, tokens)) <= TOLERANCE


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_key_value_heads": 4},  # multi-head
        {"num_key_value_heads": 1},  # multi-query
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {"head_dim": 32},  # head_dim * heads != hidden_size
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}},
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ],
    ids=["mha", "mqa", "tied", "bias", "head_dim", "rope-linear", "rope-llama3"],
)
def test_parity_with_transformers_across_llama_variants(overrides: dict[str, Any]) -> None:
    hf, model = tiny_pair(seed=3, **overrides)
    tokens = torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(2))
    assert max_diff(model.prefill(tokens, model.new_cache()), dense_logits(hf, tokens)) <= TOLERANCE
    if overrides.get("tie_word_embeddings"):
        # a [dim, V] copy of the tied weight, with the final norm's weight folded into its rows
        norm = hf.model.norm.weight.detach() * model.args.dim**0.5
        assert torch.allclose(model.lm_head, model.embed.t() * norm[:, None])
        assert model.lm_head.data_ptr() != model.embed.data_ptr()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_the_rest_of_the_family_matches_transformers_dense_and_streaming(family: str) -> None:
    """Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k head norms; its own head_dim) through
    the same forward: dense logits equal transformers', and across evictions equal the
    brute-force StreamingLLM reference."""
    extra = {"head_dim": 32} if family == "qwen3" else {}
    hf, model = tiny_pair(seed=5, family=family, tie_word_embeddings=family == "qwen2", **extra)
    assert type(hf).__name__.lower().startswith(family)
    layer = model.layers[0]
    assert (layer.bqkv is not None) == (family == "qwen2") and layer.bo is None
    assert (layer.qk_norm is not None) == (family == "qwen3")
    tokens = torch.randint(0, 128, (60,), generator=torch.Generator().manual_seed(4))
    assert max_diff(model.prefill(tokens, model.new_cache()), dense_logits(hf, tokens)) <= TOLERANCE
    reference = NaiveStream(hf, sink=4, window=16)
    expected = torch.stack([reference.step(int(t)) for t in tokens])
    for chunks in ([7, 30, 23], None):  # prefill in chunks, then decode one by one
        ours = run(model, model.new_cache(sink=4, window=16), tokens, chunks)
        assert max_diff(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("sink", [4, 1, 0])
@pytest.mark.parametrize(
    "chunks",
    [None, [1, 3, 17, 40, 2, 16, 21], [100], [4, 16, 16, 64]],
    ids=["one-by-one", "mixed", "one-chunk", "aligned"],
)
def test_matches_naive_reference_across_evictions(
    tiny: tuple[LlamaForCausalLM, Model], sink: int, chunks: list[int] | None
) -> None:
    """Streaming 100 tokens through sink + 16: logits equal the masked brute-force reference."""
    hf, model = tiny
    tokens = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(sink))
    expected = reference_logits(sink)
    ours = run(model, model.new_cache(sink=sink, window=16), tokens, chunks)
    assert max_diff(ours, expected) <= TOLERANCE
    # Sanity: after evictions the reference really differs from dense attention.
    assert max_diff(expected[-1], dense_logits(hf, tokens)[-1]) > 1e-2


def test_batched_decode_equals_separate_sessions(tiny: tuple[LlamaForCausalLM, Model]) -> None:
    """One decode over sessions at different fills = each session decoded on its own."""
    _, model = tiny
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=gen) for n in (3, 18, 70)]
    batched = [model.new_cache(sink=4, window=16) for _ in prompts]
    single = [model.new_cache(sink=4, window=16) for _ in prompts]
    for prompt, a, b in zip(prompts, batched, single, strict=True):
        model.prefill(prompt, a)
        model.prefill(prompt, b)
    for _ in range(25):
        tokens = torch.randint(0, 128, (3,), generator=gen)
        together = model.decode(tokens, batched)
        alone = torch.stack(
            [model.decode_one_token(int(t), c) for t, c in zip(tokens, single, strict=True)]
        )
        assert max_diff(together, alone) <= 1e-5
    assert [c.tokens_seen for c in batched] == [28, 43, 95]


def test_batched_decode_rejects_mismatched_sessions(tiny: tuple[LlamaForCausalLM, Model]) -> None:
    _, model = tiny
    cache = model.new_cache()
    with pytest.raises(ValueError, match="one token per session"):
        model.decode(torch.tensor([1, 2]), [cache, cache])


def test_prefill_rejects_no_tokens_and_empty_chunks(tiny: tuple[LlamaForCausalLM, Model]) -> None:
    _, model = tiny
    with pytest.raises(ValueError, match="at least one token"):
        model.prefill([], model.new_cache())
    with pytest.raises(ValueError, match="chunk_size"):
        model.prefill([1, 2], model.new_cache(), chunk_size=0)


def test_prefill_last_only_returns_the_last_logits(tiny: tuple[LlamaForCausalLM, Model]) -> None:
    _, model = tiny
    tokens = torch.randint(0, 128, (30,))
    full = model.prefill(tokens, model.new_cache(sink=2, window=8), chunk_size=7)
    last = model.prefill(tokens, model.new_cache(sink=2, window=8), chunk_size=7, last_only=True)
    assert last.shape == (1, 128)
    assert max_diff(last[0], full[-1]) <= 1e-5


def test_rope_keeps_precision_at_a_million_positions(tiny: tuple[LlamaForCausalLM, Model]) -> None:
    """q·k rotated at T ~ 1e6 equals q·k rotated at their small relative positions."""
    _, model = tiny
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 16, generator=gen), torch.randn(1, 1, 16, generator=gen)

    def score(tq: int, tk: int) -> float:
        cq, sq = model.rope([tq])
        ck, sk = model.rope([tk])
        return float((rotate(q, cq, sq) * rotate(k, ck, sk)).sum())

    from engine.model import rotate

    for far in (10**6, 10**6 + 12345, 3 * 10**7):
        for gap in (0, 1, 7, 1019):
            assert score(far + gap, far) == pytest.approx(score(gap, 0), abs=1e-4)


def test_decoding_at_a_million_tokens_matches_decoding_near_zero(
    tiny: tuple[LlamaForCausalLM, Model],
) -> None:
    """A cache whose stream sits ~1e6 tokens later (window keys rotated 1e6 further) decodes the
    same logits: only relative positions matter, and the large angles keep their precision."""
    _, model = tiny
    sink, window, shift = 4, 16, 62500 * 16  # a multiple of the window keeps the ring layout
    near = model.new_cache(sink=sink, window=window)
    model.prefill(torch.randint(0, 128, (40,)), near)
    far = model.new_cache(sink=sink, window=window)
    far.tokens_seen = near.tokens_seen + shift
    far.values.copy_(near.values)
    far.keys.copy_(near.keys)
    angle = shift * model.inv_freq  # fp64, [D/2]
    cos, sin = torch.cat((angle, angle)).cos(), torch.cat((angle, angle)).sin()
    k = near.keys[:, :, sink:].double()  # window keys only: sinks stay at positions 0..sink-1
    half = k.shape[-1] // 2
    turned = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
    far.keys[:, :, sink:] = turned.float()
    for token in (5, 77, 3, 120):
        assert max_diff(
            model.decode_one_token(token, far), model.decode_one_token(token, near)
        ) <= (TOLERANCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    """The CUDA path: exact in fp32, close in its default bf16."""
    hf, cpu = tiny_pair(seed=7)
    tokens = torch.randint(0, 128, (60,))
    state = hf.state_dict()
    args = cpu.args
    expected = run(cpu, cpu.new_cache(sink=4, window=16), tokens, [30, 30])
    fp32 = Model(args, state, device="cuda", dtype=torch.float32)
    assert max_diff(run(fp32, fp32.new_cache(4, 16), tokens, [30, 30]).cpu(), expected) <= 1e-3
    bf16 = Model(args, state, device="cuda")
    assert bf16.dtype == torch.bfloat16
    ours = run(bf16, bf16.new_cache(4, 16), tokens, [10, 20, 30]).cpu()
    assert max_diff(ours, expected) <= 0.1 * float(expected.abs().max())


@pytest.mark.slow
def test_real_model_matches_transformers(real: tuple[Model, Any]) -> None:
    """SmolLM2-135M: our forward vs transformers on the same converted weights."""
    from engine.weights import converted_dir, default_model_path

    model, tokenizer = real
    hf = LlamaForCausalLM.from_pretrained(converted_dir(default_model_path()), dtype=torch.float32)
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    tokens = torch.tensor(ids)
    expected = dense_logits(hf.eval(), tokens)
    assert max_diff(model.prefill(tokens, model.new_cache()), expected) <= TOLERANCE
    assert max_diff(run(model, model.new_cache(), tokens[:12], None), expected[:12]) <= TOLERANCE


@pytest.mark.slow
def test_real_model_matches_naive_reference_across_evictions(real: tuple[Model, Any]) -> None:
    from engine.weights import converted_dir, default_model_path

    model, tokenizer = real
    hf = LlamaForCausalLM.from_pretrained(converted_dir(default_model_path()), dtype=torch.float32)
    text = "Once upon a time, in a small village by the sea, there lived an old fisherman. " * 3
    tokens = torch.tensor(tokenizer.encode(text))[:70]
    reference = NaiveStream(hf.eval(), sink=4, window=24)
    expected = torch.stack([reference.step(int(t)) for t in tokens])
    cache = model.new_cache(sink=4, window=24)
    ours = torch.cat(
        [model.prefill(tokens[:33], cache, chunk_size=13), run(model, cache, tokens[33:], None)]
    )
    assert max_diff(ours, expected) <= TOLERANCE
