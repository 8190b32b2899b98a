"""Every setting a deployment needs, read the same way by every command.

Precedence, highest first: command-line flags, ``CHORUS_*`` environment variables, an
env file, the defaults below. The env file is ``--env-file PATH``, else
``$CHORUS_ENV_FILE``, else ``.env.sidecar`` in the working directory when it exists.
An empty value (``CHORUS_MODEL=``) counts as unset. ``python -m runtime settings``
prints what won.

Values a child process needs still reach it the way they always did: the supervisor
passes them as flags (``--sink``, ``--max-bytes``, …) or, where the child has read an
environment variable all along (``CHORUS_CORPUS``, ``CHORUS_RAG_METHOD``,
``CHORUS_CACHE_DIR``), as that variable.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import ConfigError
from .gateway.options import (
    DEFAULT_HOST,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_STREAMS,
    DEFAULT_PORT,
    DEFAULT_RATE_LIMIT,
)

ENV_PREFIX = "CHORUS_"
DEFAULT_ENV_FILE = ".env.sidecar"
ENV_FILE_VARIABLE = "CHORUS_ENV_FILE"


class Settings(BaseSettings):
    """The settings of one Chorus instance (``launch``, ``serve`` and the tools)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,
        extra="forbid",
        validate_default=True,
        dotenv_filtering="only_existing",  # other tools' lines may share the file; typos: _check_names
    )

    data_dir: Path = Field(
        Path("data"), description="where keys, logs, summaries and the run's sockets live"
    )
    model: str | None = Field(
        None, description="a local Hugging Face directory or .gguf file (empty: SmolLM2-135M)"
    )
    device: Literal["cuda", "mps", "cpu"] | None = Field(
        None, description="where the model runs: cuda, mps or cpu (empty: the best available)"
    )
    sink: int = Field(4, ge=0, description="attention sink tokens kept in the engine's cache")
    window: int = Field(1020, ge=1, description="recent tokens kept in the engine's cache")
    engine: bool = Field(True, description="start the engine (false: bus, narrator and agents)")
    engine_threads: int | None = Field(
        None, ge=1, description="CPU threads for the model's math (empty: one per core but one)"
    )
    engine_idle_s: float = Field(
        900.0, gt=0, description="the engine evicts a session idle this many seconds"
    )
    cache_dir: Path | None = Field(
        None, description="converted-model cache (empty: ~/.cache/chorus)"
    )
    corpus: str | None = Field(
        None, description="folders of .md/.txt for search and rag, ':'-separated (empty: docs)"
    )
    rag_method: Literal["bm25", "dense", "hybrid"] = Field(
        "hybrid", description="how the rag agent retrieves: bm25, dense or hybrid"
    )
    bind: str | None = Field(
        None, description="broker endpoint tcp://HOST:PORT (empty: ipc sockets in data/run)"
    )
    allow_remote: bool = Field(
        False, description="let the broker and the engine bind a non-loopback address"
    )
    engine_bind: str | None = Field(
        None,
        description="engine endpoint tcp://HOST:PORT, for workers on other hosts "
        "(empty: an ipc socket in data/run)",
    )
    max_bytes: int = Field(
        1 << 20, ge=1, description="largest message the broker accepts, in bytes"
    )
    log_retain_days: float = Field(
        14.0, gt=0, description="the bus log drops hour files older than this many days"
    )
    log_retain_mb: float = Field(
        1024.0, gt=0, description="the bus log drops its oldest files above this many MB"
    )
    log_redact: bool = Field(
        False, description="write user and narrator text to the bus log as hashes"
    )
    gateway_host: str = Field(
        DEFAULT_HOST, description="the gateway's address (anything but loopback is public)"
    )
    gateway_port: int = Field(
        DEFAULT_PORT, ge=0, le=65535, description="the gateway's HTTP port (0 picks a free one)"
    )
    gateway_allow_origin: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed to call the API, comma-separated"
    )
    gateway_rate_limit: str = Field(
        DEFAULT_RATE_LIMIT,
        description="POST /v1/chat requests per token (N/s, N/min, N/hour; 0: off)",
    )
    gateway_max_body: int = Field(
        DEFAULT_MAX_BODY, ge=1, description="largest request body the gateway takes, in bytes"
    )
    gateway_max_streams: int = Field(
        DEFAULT_MAX_STREAMS,
        ge=1,
        description="open chat and event streams per token at once (the next gets 429)",
    )
    gate_min_gap_s: float = Field(
        4.0, gt=0, description="seconds between two progress updates to the user"
    )
    gate_idle_s: float = Field(
        8.0, gt=0, description="seconds of silence while tasks run before a progress update"
    )
    gate_coalesce_s: float = Field(
        0.3, ge=0, description="agent events this close together are told in one utterance"
    )
    narrator_prompt: Path | None = Field(
        None, description="the narrator's system prompt file (empty: prompts/narrator.md)"
    )
    narrator_sampling: str = Field(
        "",
        description="the narrator's sampling, e.g. temperature=0.3,top_p=0.9,top_k=0,seed=0,max_tokens=96",
    )
    candidate_prompt: Path | None = Field(
        None, description="a candidate narrator's prompt file, for the shadow and the canary"
    )
    candidate_sampling: str = Field("", description="the candidate narrator's sampling overrides")
    candidate_engine: str | None = Field(
        None, description="endpoint of another engine for the candidate (empty: the instance's)"
    )
    candidate_model: str | None = Field(
        None,
        description="a model for the candidate (local HF dir or .gguf): launch serves it from a "
        "second engine, engine-candidate",
    )
    shadow_narrator: bool = Field(
        False, description="run the candidate as narrator-shadow, speaking on shadow.user.out"
    )
    canary_percent: float = Field(
        0.0, ge=0, le=100, description="percent of conversations the candidate narrator answers"
    )
    canary_min_samples: int = Field(
        20, ge=1, description="utterances of each narrator voice before the canary is judged"
    )
    canary_max_error_delta: float = Field(
        0.05,
        ge=0,
        description="rollback when the candidate's error rate passes the baseline's by this",
    )
    canary_max_latency_ratio: float = Field(
        1.5,
        ge=1,
        description="rollback when the candidate's median first token is this many times slower",
    )
    canary_timeout_s: float = Field(
        60.0, gt=0, description="the candidate's engine must answer within this (else: an error)"
    )
    debug: bool = Field(False, description="verbose logs and tracebacks")
    log_json: bool = Field(
        False, description="log JSON lines to data/logs/process/ instead of the console"
    )

    @field_validator("gateway_allow_origin", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def env_name(cls, field: str) -> str:
        return ENV_PREFIX + field.upper()

    @classmethod
    def load(
        cls, env_file: str | os.PathLike[str] | None = None, **flags: Any
    ) -> tuple[Settings, Path | None]:
        """The settings from ``flags`` > ``CHORUS_*`` > the env file > defaults, and the
        env file that was read (None when there was none)."""
        path = _env_file(env_file)
        if path is not None:
            _check_names(path)
        try:
            return cls(_env_file=path, **flags), path  # type: ignore[call-arg]
        except ValidationError as exc:
            problems = "; ".join(
                f"{cls.env_name(str(e['loc'][0])) if e['loc'] else '?'}: {e['msg']}"
                for e in exc.errors()
            )
            where = f" (env file {path})" if path else ""
            raise ConfigError(f"bad setting{where}: {problems}") from None

    def as_env(self) -> dict[str, str]:
        """``CHORUS_NAME`` -> value as an env file writes it ("" for unset)."""
        return {
            self.env_name(name): _env_value(getattr(self, name)) for name in type(self).model_fields
        }


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def _check_names(path: Path) -> None:
    """A ``CHORUS_*`` line the settings do not know is a typo, not something to ignore."""
    from dotenv import dotenv_values

    known = {Settings.env_name(name) for name in Settings.model_fields} | {ENV_FILE_VARIABLE}
    unknown = sorted(
        key for key in dotenv_values(path) if key.startswith(ENV_PREFIX) and key not in known
    )
    if unknown:
        raise ConfigError(
            f"env file {path} sets {', '.join(unknown)}, which Chorus does not know; "
            "the settings are listed in .env.sidecar.example"
        )


def _env_file(explicit: str | os.PathLike[str] | None) -> Path | None:
    if explicit is None:
        explicit = os.environ.get(ENV_FILE_VARIABLE) or None
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(
                f"env file {path} does not exist; fix --env-file or ${ENV_FILE_VARIABLE}"
            )
        return path
    default = Path(DEFAULT_ENV_FILE)
    return default if default.is_file() else None


# -- the command line --------------------------------------------------------------------

# setting -> the argparse destination of the flag that sets it (where a command has one)
FLAGS: dict[str, str] = {
    "data_dir": "data_dir",
    "debug": "debug",
    "log_json": "log_json",
    "model": "model",
    "device": "device",
    "sink": "sink",
    "window": "window",
    "engine": "no_engine",  # inverted
    "engine_threads": "engine_threads",
    "engine_idle_s": "engine_idle_s",
    "corpus": "corpus",
    "bind": "bind",
    "allow_remote": "allow_remote",
    "engine_bind": "engine_bind",
    "max_bytes": "max_bytes",
    "log_retain_days": "log_retain_days",
    "log_retain_mb": "log_retain_mb",
    "log_redact": "log_redact",
    "gateway_host": "host",
    "gateway_port": "port",
    "gateway_allow_origin": "allow_origin",
    "gateway_rate_limit": "rate_limit",
    "gateway_max_body": "max_body",
    "gateway_max_streams": "max_streams",
    "narrator_prompt": "narrator_prompt",
    "narrator_sampling": "narrator_sampling",
    "candidate_prompt": "candidate_prompt",
    "candidate_sampling": "candidate_sampling",
    "candidate_engine": "candidate_engine",
    "candidate_model": "candidate_model",
    "shadow_narrator": "shadow_narrator",
    "canary_percent": "canary_percent",
    "canary_min_samples": "canary_min_samples",
    "canary_max_error_delta": "canary_max_error_delta",
    "canary_max_latency_ratio": "canary_max_latency_ratio",
    "canary_timeout_s": "canary_timeout_s",
}


def from_args(args: argparse.Namespace) -> Settings:
    """The settings for a parsed command line whose flags default to None (unset), and
    the namespace filled in with the winners, so flags and settings never disagree."""
    given: dict[str, Any] = {}
    for name, dest in FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if name == "engine":
            value = not value
        elif name == "corpus":
            value = str(value)
        given[name] = value
    settings, path = Settings.load(getattr(args, "env_file", None), **given)
    for name, dest in FLAGS.items():
        if hasattr(args, dest):
            value = getattr(settings, name)
            setattr(args, dest, (not value) if name == "engine" else value)
    args.settings = settings
    args.settings_from_flags = frozenset(given)
    args.env_file = path
    return settings


def env_example() -> str:
    """``.env.sidecar.example``: every setting at its default, one comment line each."""
    lines = [
        "# Chorus settings: copy to .env.sidecar (read from the working directory, or",
        "# pass --env-file PATH / set CHORUS_ENV_FILE). Precedence: command-line flags >",
        "# CHORUS_* environment variables > this file > the defaults shown here.",
        "# An empty value means unset. Generated from runtime/settings.py; a test keeps it in step.",
    ]
    defaults = Settings.model_construct().as_env()
    for name, info in Settings.model_fields.items():
        lines += [
            "",
            f"# {info.description}",
            f"{Settings.env_name(name)}={defaults[Settings.env_name(name)]}",
        ]
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The settings table of ``docs/deploy.md``."""
    defaults = Settings.model_construct().as_env()
    rows = [
        "| variable | flag | default | what it sets |",
        "|---|---|---|---|",
    ]
    for name, info in Settings.model_fields.items():
        env = Settings.env_name(name)
        dest = FLAGS.get(name)
        flag = "—" if dest is None else "`--" + dest.replace("_", "-") + "`"
        default = defaults[env]
        rows.append(
            f"| `{env}` | {flag} | {f'`{default}`' if default else '(unset)'} | {info.description} |"
        )
    return "\n".join(rows) + "\n"
