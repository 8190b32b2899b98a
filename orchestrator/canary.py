"""Narrator voices and the canary that chooses between two of them.

A :class:`Voice` is one narrator configuration: a system prompt, sampling settings and,
optionally, an engine of its own (another model). The narrator process hosts the
*baseline* voice and, during a rollout, a *candidate*; only the narrator may publish
``user.out``, so the choice is made inside it, per conversation:

* :func:`bucket` puts a conversation id at a stable place in [0, 100) (SHA-256, the same
  in every process and after restarts); the conversations below ``percent`` hear the
  candidate. Raising the percent keeps every conversation already on the candidate there.
* :class:`Canary` keeps each voice's recent record (errors, time to first token) and
  says when the candidate must be rolled back: its error rate passes the baseline's by
  ``max_error_delta``, or its median first-token latency passes ``max_latency_ratio``
  times the baseline's, once both have ``min_samples`` utterances (a baseline with fewer
  counts as error-free, and then only the error rule applies).
* :class:`RolloutState` is the decision that outlives the process (``data/rollout.json``):
  a candidate that was rolled back is not started again by a restarted narrator, and a
  promoted one keeps all conversations.

Everything here is pure (no bus, no engine), so its tests drive it directly.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec

from engine.sampling import SamplingParams
from runtime import messages as m
from runtime.errors import ConfigError
from runtime.paths import write_atomic

from . import prompts

Arm = Literal["baseline", "candidate"]
Phase = Literal["running", "rolled_back", "promoted"]

# the sampling a voice may change, and the type of each
SAMPLING_KEYS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "max_tokens": int,
}
PROMPT_SLOTS = frozenset({"summary"})  # what a narrator system prompt may ask for
WINDOW = 200  # outcomes kept per voice: old ones age out
REPORT_EVERY_S = 60.0  # a running canary reports its figures at most this often


def parse_sampling(text: str) -> dict[str, float | int]:
    """``"temperature=0.7,max_tokens=128"`` -> the overrides it names; a ValueError
    names the bad part and the keys there are."""
    out: dict[str, float | int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = (s.strip() for s in part.partition("="))
        kind = SAMPLING_KEYS.get(key)
        if not sep or kind is None:
            raise ValueError(
                f"cannot read sampling {part.strip()!r}: use KEY=VALUE, comma-separated, "
                f"with KEY one of {', '.join(SAMPLING_KEYS)}"
            )
        try:
            out[key] = kind(value)
        except ValueError:
            raise ValueError(f"sampling {key} wants a {kind.__name__}, not {value!r}") from None
    return out


@dataclass(frozen=True)
class Voice:
    """One narrator configuration. ``prompt`` None is ``prompts/narrator.md``; ``engine``
    None is the instance's engine (else the endpoint of another engine that holds this
    instance's engine key)."""

    prompt: Path | None = None
    sampling: str = ""
    engine: str | None = None

    def params(self, base: SamplingParams, *, keep_length: bool = False) -> SamplingParams:
        """``base`` with this voice's overrides (``keep_length``: not its max_tokens, for
        progress lines, which stay short whatever the voice)."""
        overrides = parse_sampling(self.sampling)
        if keep_length:
            overrides.pop("max_tokens", None)
        return msgspec.structs.replace(base, **overrides)

    def system_prompt(self, summary: str) -> str:
        """The system prompt with the conversation's summary (appended when the prompt
        file has no ``{summary}`` slot)."""
        if self.prompt is None:
            return prompts.render("narrator", summary=summary).strip()
        if "summary" in prompts.slots(prompts.template(self.prompt)):
            return prompts.render(self.prompt, summary=summary).strip()
        return "\n".join(p for p in (prompts.template(self.prompt).strip(), summary) if p)

    def check(self, what: str) -> None:
        """Raise :class:`ConfigError` (naming ``what``, e.g. ``--candidate-prompt``) if the
        prompt cannot be read or asks for unknown slots, or the sampling is not valid."""
        if self.prompt is not None:
            try:
                text = self.prompt.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"{what}: cannot read the prompt {self.prompt} ({exc})") from None
            unknown = prompts.slots(text) - PROMPT_SLOTS
            if unknown:
                raise ConfigError(
                    f"{what}: the prompt {self.prompt} has slots {sorted(unknown)}; a narrator "
                    "prompt may only use {summary} (write literal braces as {{ }})"
                )
        try:
            self.params(SamplingParams())
        except ValueError as exc:
            raise ConfigError(f"{what}: {exc}") from None

    def fingerprint(self) -> str:
        """12 hex digits naming this configuration (prompt text, sampling, engine)."""
        text = ""
        if self.prompt is not None:
            try:
                text = self.prompt.read_text(encoding="utf-8")
            except OSError:
                text = str(self.prompt)
        key = msgspec.json.encode(
            [text, sorted(parse_sampling(self.sampling).items()), self.engine]
        )
        return hashlib.sha256(key).hexdigest()[:12]


def bucket(conversation: str) -> float:
    """Where ``conversation`` falls in [0, 100), the same in every process and run."""
    digest = hashlib.sha256(conversation.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100


@dataclass(frozen=True)
class Policy:
    """When the candidate is rolled back (see the module docstring)."""

    percent: float = 0.0
    min_samples: int = 20
    max_error_delta: float = 0.05
    max_latency_ratio: float = 1.5

    def __post_init__(self) -> None:
        if not 0 <= self.percent <= 100 or self.min_samples < 1:
            raise ValueError("need 0 <= percent <= 100 and min_samples >= 1")
        if self.max_error_delta < 0 or self.max_latency_ratio < 1:
            raise ValueError("need max_error_delta >= 0 and max_latency_ratio >= 1")


@dataclass
class Record:
    """One voice's recent outcomes: (failed, seconds to the first token or None)."""

    outcomes: deque[tuple[bool, float | None]] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def add(self, *, error: bool, first_token_s: float | None) -> None:
        self.outcomes.append((error, first_token_s))

    @property
    def samples(self) -> int:
        return len(self.outcomes)

    @property
    def errors(self) -> int:
        return sum(1 for error, _ in self.outcomes if error)

    @property
    def error_rate(self) -> float:
        return self.errors / self.samples if self.outcomes else 0.0

    @property
    def first_token_s(self) -> float | None:
        times = [t for error, t in self.outcomes if not error and t is not None]
        return statistics.median(times) if times else None

    def figures(self) -> m.ArmFigures:
        ftt = self.first_token_s
        return m.ArmFigures(
            samples=self.samples,
            errors=self.errors,
            first_token_s=None if ftt is None else round(ftt, 4),
        )


class Canary:
    """Which voice answers each conversation, and whether the candidate must go.

    ``phase`` is ``running`` (the candidate takes ``policy.percent`` of conversations),
    ``rolled_back`` (none) or ``promoted`` (all)."""

    def __init__(self, policy: Policy, phase: Phase = "running") -> None:
        self.policy = policy
        self.phase: Phase = phase
        self.percent = policy.percent
        self.records: dict[Arm, Record] = {"baseline": Record(), "candidate": Record()}
        self.reported = time.monotonic()

    @property
    def share(self) -> float:
        """The percent of conversations on the candidate now."""
        return {"running": self.percent, "rolled_back": 0.0, "promoted": 100.0}[self.phase]

    def arm_for(self, conversation: str) -> Arm:
        return "candidate" if bucket(conversation) < self.share else "baseline"

    def record(self, arm: Arm, *, error: bool, first_token_s: float | None = None) -> str | None:
        """Count one utterance of ``arm``; returns why the candidate must be rolled back
        when this outcome tips it (the caller then calls :meth:`roll_back`)."""
        self.records[arm].add(error=error, first_token_s=first_token_s)
        return self.verdict()

    def verdict(self) -> str | None:
        """Why the candidate must be rolled back now, or None."""
        if self.phase != "running":
            return None
        p = self.policy
        cand, base = self.records["candidate"], self.records["baseline"]
        if cand.samples < p.min_samples:
            return None
        base_known = base.samples >= p.min_samples
        base_rate = base.error_rate if base_known else 0.0
        if cand.error_rate > base_rate + p.max_error_delta:
            against = f"{base_rate:.0%} over {base.samples}" if base_known else "none assumed"
            return (
                f"candidate error rate {cand.error_rate:.0%} over {cand.samples} utterances "
                f"against the baseline's {against} (limit +{p.max_error_delta:.0%})"
            )
        cand_ftt, base_ftt = cand.first_token_s, base.first_token_s
        if base_known and cand_ftt is not None and base_ftt is not None:
            if cand_ftt > base_ftt * p.max_latency_ratio:
                return (
                    f"candidate median first token {cand_ftt:.2f} s against the baseline's "
                    f"{base_ftt:.2f} s (limit x{p.max_latency_ratio:g})"
                )
        return None

    def roll_back(self) -> None:
        self.phase = "rolled_back"

    def promote(self) -> None:
        self.phase = "promoted"

    def resume(self) -> None:
        """Run the candidate again at ``percent``, with a fresh record for it."""
        self.phase = "running"
        self.records["candidate"] = Record()

    def set_percent(self, percent: float) -> None:
        if not 0 <= percent <= 100:
            raise ValueError(f"canary_percent must be within 0..100, not {percent:g}")
        self.percent = percent

    def report_due(self) -> bool:
        """True at most once per ``REPORT_EVERY_S`` while the candidate runs."""
        now = time.monotonic()
        if self.phase != "running" or now - self.reported < REPORT_EVERY_S:
            return False
        self.reported = now
        return True


class RolloutState(msgspec.Struct, frozen=True, kw_only=True):
    """What became of a candidate, kept in ``data/rollout.json``."""

    candidate: str  # fingerprint
    phase: Phase
    reason: str = ""
    ts: float = 0.0


def load_phase(path: Path, candidate: str) -> Phase:
    """The saved phase of ``candidate`` (``running`` when none was saved for it)."""
    try:
        state = msgspec.json.decode(path.read_bytes(), type=RolloutState)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return "running"
    return state.phase if state.candidate == candidate else "running"


def save_phase(path: Path, candidate: str, phase: Phase, reason: str = "") -> None:
    state = RolloutState(candidate=candidate, phase=phase, reason=reason, ts=time.time())
    write_atomic(path, msgspec.json.encode(state) + b"\n")
