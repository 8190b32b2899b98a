"""A compact Llama-family forward over StreamingLLM caches (gpt-fast style).

The family: Llama (1-3.x), Mistral, Qwen2 and Qwen3 share this block (RMSNorm, RoPE,
grouped query attention, SwiGLU); Qwen2 adds biases on q/k/v, which the fused projection
takes, and Qwen3 an RMSNorm over each query and key head before RoPE.

Two stages: `prefill` appends a prompt to one session, `decode` appends one token to
each of B sessions at once. Linear layers run batched over the sessions; attention runs
per session against that session's `SinkCache` (see cache.py for why keys are stored
rotated by their absolute index and queries are rotated twice).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from engine.cache import SinkCache
from engine.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_KEYS = {  # rope types we implement, and the parameters each needs
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a Llama-family model, read from a Hugging Face `config.json`."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] = field(default_factory=dict)  # empty: plain RoPE
    tie_embeddings: bool = False
    eos_ids: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        """Read a Hugging Face config dict; raise `ModelLoadError` if it is not one of
        the family (`SUPPORTED_ARCHITECTURES`) or uses what this forward lacks."""
        archs = config.get("architectures") or []
        if not (set(archs) & set(SUPPORTED_ARCHITECTURES)) and (
            archs or config.get("model_type") not in SUPPORTED_MODEL_TYPES
        ):
            found = ", ".join(archs) or config.get("model_type", "unknown")
            raise ModelLoadError(
                f"unsupported architecture {found}: "
                f"supported are {', '.join(SUPPORTED_ARCHITECTURES)} (HF directory or GGUF)"
            )
        if config.get("use_sliding_window"):  # Qwen2's and Qwen3's own windowed layers
            raise ModelLoadError(
                "unsupported use_sliding_window: true: the cache's window is the only one here"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(
                f"unsupported hidden_act {config['hidden_act']!r}: Llama needs silu"
            )
        # transformers 5 writes `rope_parameters`; older configs write rope_theta + rope_scaling.
        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_KEYS:
            raise ModelLoadError(
                f"unsupported rope type {rope_type!r}: supported are {', '.join(ROPE_KEYS)}"
            )
        if missing := [k for k in ROPE_KEYS[rope_type] if k not in rope]:
            raise ModelLoadError(
                f"rope type {rope_type!r} needs {', '.join(missing)} in config.json"
            )
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        eos = config.get("eos_token_id")
        try:
            n_heads = int(config["num_attention_heads"])
            return cls(
                dim=int(config["hidden_size"]),
                n_layers=int(config["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                head_dim=int(config.get("head_dim") or config["hidden_size"] // n_heads),
                hidden_dim=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling={**rope, "rope_type": rope_type} if rope_type != "default" else {},
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                eos_ids=tuple(eos)
                if isinstance(eos, list)
                else (() if eos is None else (int(eos),)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is incomplete or malformed ({exc!r})") from exc


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse RoPE frequencies, computed as transformers does (fp32), returned as fp64. # [D/2]"""
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    rope_type = args.rope_scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(args.rope_scaling["factor"])
    elif rope_type == "llama3":
        # Llama 3.1: slow frequencies are divided by `factor`, fast ones kept, the middle blended.
        factor, low, high, context = (
            float(args.rope_scaling[k])
            for k in ROPE_KEYS["llama3"]  # factor, low/high_freq_factor, original context
        )
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq.double()


def normalize(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm without its weight and its sqrt(dim), both folded into the matmul
    that follows (see `Model`): x / sqrt(|x|^2 + dim * eps), in fp32 like transformers.

    x: [..., dim] (Qwen3's head norms pass [N, H, D]); floor: sqrt(dim * eps), 0-dim.
    Three small ops instead of RMSNorm's six:
    a decode step normalises 61 times, and at one row per call the op count is the cost.
    """
    x32 = x.float()
    out = x32 / torch.hypot(torch.linalg.vector_norm(x32, dim=-1, keepdim=True), floor)
    return out.to(x.dtype)


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, turned: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply RoPE (rotate-half layout). x: [N, H, D]; cos, sin: [N, D] from `Model.rope`,
    whose `sin` carries rotate-half's sign (-sin on the first half), so the partner
    [-x2, x1] * sin is a plain `roll`: x * cos + roll(x) * sin. ``turned``: roll(x), when
    the caller already has it (one roll serves two rotations of a query)."""
    if turned is None:
        turned = x.roll(x.shape[-1] // 2, -1)
    return torch.addcmul(x * cos[:, None], turned, sin[:, None])


def attend(
    q_window: torch.Tensor,
    q_sink: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    n_sink: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """One softmax over [q_sink·K_sink | q_window·K_window], then the weighted sum of V.

    q_*: [Hkv, G*C, D], query heads grouped by the kv head they share (GQA), so plain bmm
    needs no copies of K/V; keys/values: [Hkv, N, D], sink keys first; mask: [C, N].
    Returns [Hkv, G*C, D].
    """
    scores = torch.bmm(q_window, keys.transpose(1, 2))  # [Hkv, G*C, N]
    if n_sink:
        scores[..., :n_sink] = torch.bmm(q_sink, keys[:, :n_sink].transpose(1, 2))
    scores = scores.float()  # softmax in fp32 also under bf16; 1/sqrt(D) is in the weights
    if mask is not None:
        scores.view(scores.shape[0], -1, *mask.shape).masked_fill_(~mask, -math.inf)
    return torch.bmm(torch.softmax(scores, dim=-1).to(values.dtype), values)


def linear(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w_t (+ bias). x: [N, in], w_t: [in, out], stored transposed and contiguous.

    A decode step multiplies one row by each weight matrix, so it is bound by reading
    the weights. On the CPU, BLAS reads an [in, out] matrix for ``x @ W`` markedly
    faster than the [out, in] layout of ``F.linear`` (measured on this machine, one
    thread: 1.4x for q/k/v, 1.7x for gate/up and the 113 MB LM head), except for the
    MLP's down projection (in = 1536, out = 576), read 1.4x faster as [out, in]: that
    one is passed as the transposed view of an [out, in] matrix.
    """
    return torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)


def linear_add(
    residual: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """residual + x @ w_t (+ bias), the sum done inside the matmul when there is no bias."""
    if bias is None:
        return torch.addmm(residual, x, w_t)
    return residual + torch.addmm(bias, x, w_t)


@dataclass
class Layer:
    """One transformer block's weights, transposed to [in, out] (see `linear`), with
    q/k/v and gate/up fused for fewer matmuls, and each RMSNorm's weight (times sqrt(dim))
    folded into the rows of the matmul it feeds: (x / rms(x) * w) @ W = (x / rms(x)) @ (w W).
    The query columns also carry attention's 1/sqrt(D), or, where q and k heads are
    normalised (Qwen3), ``qk_norm``'s query rows do."""

    wqkv: torch.Tensor  # [dim, (Hq + 2 Hkv) * D]
    bqkv: torch.Tensor | None
    qk_norm: torch.Tensor | None  # [Hq + Hkv, D]: each head's RMSNorm weight (Qwen3)
    wo: torch.Tensor  # [Hq * D, dim]
    bo: torch.Tensor | None
    w_gate_up: torch.Tensor  # [dim, 2 * hidden]
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor  # [hidden, dim], a view of an [dim, hidden] matrix
    b_down: torch.Tensor | None


def pick_device(device: torch.device | str | None = None) -> torch.device:
    """The given device, else cuda > mps > cpu."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Model:
    """A Llama-family causal LM that reads and writes `SinkCache`s. Weights are loaded once."""

    def __init__(
        self,
        args: ModelArgs,
        state: Mapping[str, torch.Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.args = args
        self.device = pick_device(device)
        # bf16 halves memory traffic on CUDA; CPU matmuls are fastest and exact in fp32.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.inv_freq = rope_frequencies(args)  # [D/2], fp64 on the CPU

        def take(name: str) -> torch.Tensor:  # fp32 until placed: folding rounds once
            if name not in state:
                raise ModelLoadError(f"weight {name} missing from the checkpoint")
            return state[name].to(self.device, torch.float32)

        def place(w: torch.Tensor) -> torch.Tensor:
            return w.to(self.dtype).contiguous()

        def fuse(names: list[str], scale: torch.Tensor | None = None) -> torch.Tensor | None:
            present = [n in state for n in names]
            if not any(present):
                return None
            bias = torch.cat([take(n) for n in names])
            return place(bias if scale is None else bias * scale)

        def take_t(names: list[str], norm: str | None = None) -> torch.Tensor:
            """Fused, [in, out] for `linear`, with the RMSNorm `norm` folded into its rows."""
            w = torch.cat([take(n) for n in names]).t()
            if norm is not None:
                w = w * (take(norm) * args.dim**0.5)[:, None]
            return w

        q_cols = args.n_heads * args.head_dim
        # 1/sqrt(D) on the query columns: attention then needs no scaling op
        q_scale = torch.ones((args.n_heads + 2 * args.n_kv_heads) * args.head_dim)
        q_scale[:q_cols] = args.head_dim**-0.5
        q_scale = q_scale.to(self.device)
        self.norm_floor = torch.tensor((args.dim * args.norm_eps) ** 0.5, device=self.device)
        self.head_floor = torch.tensor((args.head_dim * args.norm_eps) ** 0.5, device=self.device)

        def head_norms(p: str) -> torch.Tensor | None:
            """Qwen3's q_norm and k_norm as one [Hq + Hkv, D] weight for `normalize`'s
            output: times sqrt(D) (RMSNorm's, as for the other norms); on the query
            rows that cancels attention's 1/sqrt(D)."""
            if p + "q_norm.weight" not in state:
                return None
            q = take(p + "q_norm.weight").expand(args.n_heads, -1)
            k = take(p + "k_norm.weight").expand(args.n_kv_heads, -1) * args.head_dim**0.5
            return place(torch.cat([q, k]))

        self.embed = place(take("model.embed_tokens.weight"))  # [V, dim]
        tied = args.tie_embeddings or "lm_head.weight" not in state
        # tied or not, the head is its own [dim, V] copy: the layout `linear` reads fastest
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        self.lm_head = place(take_t([head], norm="model.norm.weight"))
        self.layers: list[Layer] = []
        for i in range(args.n_layers):
            p = f"model.layers.{i}."
            attn, mlp = (
                [p + f"self_attn.{n}_proj" for n in "qkv"],
                [p + "mlp.gate_proj", p + "mlp.up_proj"],
            )
            wqkv = take_t([n + ".weight" for n in attn], norm=p + "input_layernorm.weight")
            qk_norm = head_norms(p + "self_attn.")
            scale = q_scale if qk_norm is None else None  # a normalised head ignores scale
            self.layers.append(
                Layer(
                    wqkv=place(wqkv if scale is None else wqkv * scale),
                    bqkv=fuse([n + ".bias" for n in attn], scale),
                    qk_norm=qk_norm,
                    wo=place(take_t([p + "self_attn.o_proj.weight"])),
                    bo=fuse([p + "self_attn.o_proj.bias"]),
                    w_gate_up=place(
                        take_t(
                            [n + ".weight" for n in mlp], norm=p + "post_attention_layernorm.weight"
                        )
                    ),
                    b_gate_up=fuse([n + ".bias" for n in mlp]),
                    # stored [out, in] and used through a transposed view: for this tall,
                    # narrow matrix BLAS reads that layout faster (see `linear`)
                    w_down=place(take(p + "mlp.down_proj.weight")).t(),
                    b_down=fuse([p + "mlp.down_proj.bias"]),
                )
            )

    def new_cache(self, sink: int = 4, window: int = 1020) -> SinkCache:
        """An empty cache for one session, on this model's device and dtype."""
        a = self.args
        return SinkCache(
            a.n_layers, a.n_kv_heads, a.head_dim, sink, window, self.device, self.dtype
        )

    def rope(self, positions: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at (possibly huge) positions, with fp64 angles so T ~ 1e6 keeps precision;
        sin with rotate-half's sign on its first half (see `rotate`). # [N, D]"""
        angles = torch.as_tensor(positions, dtype=torch.float64)[:, None] * self.inv_freq
        sin = angles.sin()
        cos = angles.cos().repeat(1, 2)
        sin = torch.cat((-sin, sin), dim=-1)
        return cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)

    def project_qkv(
        self,
        layer: Layer,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalise, project and rotate. x: [N, dim]; rope: cos, sin at the stream
        positions T and at the query's in-cache positions m (see cache.py), [N, D] each.

        Returns the query rotated by T (for window keys) and by m (for sink keys), [N, Hq, D],
        the key rotated by T and the value, [N, Hkv, D]. Query and key heads are adjacent
        columns, so one `roll` and one rotation serve both.
        """
        a, n = self.args, x.shape[0]
        cos, sin, cos_m, sin_m = rope
        qkv = linear(normalize(x, self.norm_floor), layer.wqkv, layer.bqkv)
        qk_cols = (a.n_heads + a.n_kv_heads) * a.head_dim
        qk = qkv[:, :qk_cols].view(n, -1, a.head_dim)  # [N, Hq + Hkv, D]
        if layer.qk_norm is not None:
            qk = normalize(qk, self.head_floor) * layer.qk_norm
        turned = qk.roll(a.head_dim // 2, -1)
        q_sink = rotate(qk[:, : a.n_heads], cos_m, sin_m, turned[:, : a.n_heads])
        qk = rotate(qk, cos, sin, turned)
        v = qkv[:, qk_cols:].view(n, a.n_kv_heads, a.head_dim)
        return qk[:, : a.n_heads], q_sink, qk[:, a.n_heads :], v

    def finish_layer(self, layer: Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, SiLU MLP, residual. x, attn: [N, dim] / [N, Hq * D]."""
        x = linear_add(x, attn, layer.wo, layer.bo)
        gate, up = linear(normalize(x, self.norm_floor), layer.w_gate_up, layer.b_gate_up).chunk(
            2, dim=-1
        )
        return linear_add(x, F.silu(gate) * up, layer.w_down, layer.b_down)

    def group(self, q: torch.Tensor) -> torch.Tensor:
        """[C, Hq, D] -> [Hkv, G*C, D]: query heads grouped by the kv head they share (GQA)."""
        a, c = self.args, q.shape[0]
        return (
            q.view(c, a.n_kv_heads, -1, a.head_dim)
            .permute(1, 2, 0, 3)
            .reshape(a.n_kv_heads, -1, a.head_dim)
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, in fp32. x: [N, dim] -> [N, V]."""
        return linear(normalize(x, self.norm_floor), self.lm_head, None).float()

    @torch.inference_mode()
    def decode(
        self, tokens: torch.Tensor | Sequence[int], caches: Sequence[SinkCache]
    ) -> torch.Tensor:
        """Append one token to each of B sessions; return next-token logits [B, V] (fp32).

        Linear layers run as [B, dim] matmuls; attention is per session, against its cache.
        """
        tokens = torch.as_tensor(tokens, device=self.device).view(-1)  # [B]
        if tokens.shape[0] != len(caches) or len({id(c) for c in caches}) != len(caches):
            raise ValueError("decode needs exactly one token per session and distinct caches")
        a, n = self.args, len(caches)
        rope = (
            *self.rope([c.tokens_seen for c in caches]),  # [B, D] at T
            *self.rope([c.query_position(c.tokens_seen) for c in caches]),  # at m
        )
        x = F.embedding(tokens, self.embed)  # [B, dim]
        attn = torch.empty(n, a.n_heads * a.head_dim, device=self.device, dtype=self.dtype)
        for i, layer in enumerate(self.layers):
            q_window, q_sink, k, v = self.project_qkv(layer, x, rope)
            for b, cache in enumerate(caches):
                cache.update(i, k[b, :, None], v[b, :, None])  # [Hkv, 1, D], in place
                keys, values = cache.fetch(i, pending=1)  # [Hkv, n, D]
                out = attend(
                    q_window[b].view(a.n_kv_heads, -1, a.head_dim),  # [Hkv, G, D], as `group`
                    q_sink[b].view(a.n_kv_heads, -1, a.head_dim),
                    keys,
                    values,
                    min(cache.sink, keys.shape[1]),
                    None,
                )  # no mask: every filled slot is a kept token
                attn[b] = out.reshape(-1)  # [Hkv, G, D] flattens head-major, as o_proj expects
            x = self.finish_layer(layer, x, attn)
        for cache in caches:
            cache.advance(1)
        return self.logits(x)

    def decode_one_token(self, token: int, cache: SinkCache) -> torch.Tensor:
        """Append one token to one session; return its next-token logits [V]."""
        return self.decode([token], [cache])[0]

    @torch.inference_mode()
    def prefill(
        self,
        tokens: torch.Tensor | Sequence[int],
        cache: SinkCache,
        chunk_size: int = 256,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Append T tokens to one session, in chunks; return logits [T, V] (or [1, V]).

        T may exceed the cache: tokens evicted inside a chunk are masked out for later queries.
        """
        tokens = torch.as_tensor(tokens, device=self.device).view(-1)  # [T]
        total = tokens.shape[0]
        if total == 0 or chunk_size < 1:
            raise ValueError("prefill needs at least one token and chunk_size >= 1")
        outputs: list[torch.Tensor] = []
        start = 0
        while start < total:
            size = min(chunk_size, total - start)
            if cache.tokens_seen < cache.sink:
                # Sink tokens get their own chunk, so inside a chunk every key is a window key.
                size = min(size, cache.sink - cache.tokens_seen)
            x = self.forward_chunk(tokens[start : start + size], cache)
            if not last_only or start + size == total:
                outputs.append(self.logits(x[-1:] if last_only else x))
            start += size
        return torch.cat(outputs)

    def forward_chunk(self, tokens: torch.Tensor, cache: SinkCache) -> torch.Tensor:
        """Run C tokens of one session through every layer; return hidden states [C, dim]."""
        a, c, t0 = self.args, tokens.shape[0], cache.tokens_seen
        t = torch.arange(t0, t0 + c)  # [C] stream indices of the queries
        rope = (*self.rope(t), *self.rope([cache.query_position(int(i)) for i in t]))
        # Key j is visible to query i if causal and still kept when i arrives (a sink or in i's window).
        key_t = torch.cat((cache.positions().cpu(), t))  # [N + C]
        visible = (key_t[None] <= t[:, None]) & (
            (key_t[None] < cache.sink) | (key_t[None] > t[:, None] - cache.window)
        )
        mask = visible.to(self.device)  # [C, N + C]
        x = F.embedding(tokens, self.embed)  # [C, dim]
        for i, layer in enumerate(self.layers):
            q_window, q_sink, k, v = self.project_qkv(layer, x, rope)
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, C, D]
            cached_k, cached_v = cache.fetch(i)  # [Hkv, N, D]
            out = attend(
                self.group(q_window),
                self.group(q_sink),
                torch.cat((cached_k, k), dim=1),
                torch.cat((cached_v, v), dim=1),
                min(cache.sink, cached_k.shape[1]),
                mask,
            )  # [Hkv, G*C, D]
            cache.update(i, k, v)
            heads = out.view(a.n_kv_heads, -1, c, a.head_dim).permute(2, 0, 1, 3)  # [C, Hkv, G, D]
            x = self.finish_layer(layer, x, heads.reshape(c, -1))
        cache.advance(c)
        return x
