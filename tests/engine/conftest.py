"""Engine fixtures: tiny random Llama-family models (milliseconds), a tiny tokenizer, the
real model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engine import Model, ModelArgs, load_model
from engine.server import EngineConfig, EngineServer
from runtime.paths import DataDir

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "yes no maybe yes please no thanks",
    "END of the story. The end. Stop here, STOP now.",
    "Ünïcödé text: café, naïve, 東京 and emoji 🙂.",
]


TINY: dict[str, Any] = {  # 2 layers, grouped-query: a forward takes about a millisecond
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}


def tiny_config(**overrides: Any) -> LlamaConfig:
    """A 2-layer GQA Llama small enough to run a forward in about a millisecond."""
    return LlamaConfig(**(TINY | overrides))


# the other members of the family, as transformers builds them (Qwen2: biased q/k/v;
# Qwen3: q and k heads normalised)
FAMILIES: dict[str, tuple[type[Any], type[Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_pair(
    seed: int = 0, family: str = "llama", **overrides: Any
) -> tuple[LlamaForCausalLM, Model]:
    """The same random weights as a transformers model (the reference) and as ours."""
    torch.manual_seed(seed)
    config_class, model_class = FAMILIES[family]
    hf = model_class(config_class(**(TINY | overrides))).eval()
    with torch.no_grad():  # transformers' init leaves norms at 1, biases at 0: randomise them
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    return hf, Model(ModelArgs.from_config(hf.config.to_dict()), hf.state_dict(), device="cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: thread hand-offs cost more than the math, worst on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny() -> tuple[LlamaForCausalLM, Model]:
    return tiny_pair()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of about 300 tokens, trained in milliseconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>"
    )


@pytest.fixture(scope="session")
def real() -> tuple[Any, Any]:
    """The default SmolLM2-135M-Instruct (converted once into the user's cache)."""
    return load_model(device="cpu")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@contextmanager
def serving_tiny(
    data: DataDir,
    tokenizer: PreTrainedTokenizerFast,
    config: EngineConfig,
    endpoint: str | None = None,
) -> Iterator[EngineServer]:
    """The real engine server (its ROUTER socket, ZAP handler and loop) on a tiny random
    model, in a thread, for the instance in ``data`` (keys already made), on its ipc
    socket or ``endpoint``."""
    tokenizer.chat_template = CHATML
    _, model = tiny_pair(vocab_size=len(tokenizer))
    server = EngineServer(
        model, tokenizer, endpoint or data.ipc("engine"), data.keys, config, model_name="tiny"
    )
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    assert server.ready.wait(20)
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)
