"""Choosing the next token: temperature / top-k / top-p sampling, stop strings, choices,
and output constrained to a JSON Schema (through llguidance's token masks).

A `Sampler` serves one request: `pick` chooses a token from logits, `accept` records it
and returns the text that is now safe to show (text that might be the start of a stop
string is held back until it is known not to be).
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec

if TYPE_CHECKING:
    import torch
    from llguidance import LLMatcher, LLTokenizer
    from transformers import PreTrainedTokenizerBase

FinishReason = Literal["stop", "length"]


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True):
    """How one request chooses its tokens (defaults as in the OpenAI API)."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # same seed, same logits -> same tokens
    max_tokens: int = 256
    stop: list[str] = []  # generation ends before the first occurrence of any of these
    choices: list[str] = []  # if set, the output is exactly one of these strings
    json_schema: dict[str, Any] | None = None  # if set, the output is JSON valid against it

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        if self.max_tokens < 1 or any(not s for s in self.stop) or any(not c for c in self.choices):
            raise ValueError("need max_tokens >= 1 and non-empty stop strings and choices")
        if self.choices and self.json_schema is not None:
            raise ValueError("give choices or json_schema, not both")


class SchemaError(ValueError):
    """A ``json_schema`` that cannot constrain decoding (invalid, or a feature not supported)."""


# per tokenizer (weakly: an id() could be reused by another tokenizer), per stop-id set
_grammar_tokenizers: weakref.WeakKeyDictionary[
    PreTrainedTokenizerBase, dict[tuple[int, ...], LLTokenizer]
] = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer: PreTrainedTokenizerBase, stop_ids: Collection[int]) -> LLTokenizer:
    """llguidance's view of ``tokenizer`` (built once per tokenizer: it takes about a second)."""
    from llguidance.hf import from_tokenizer

    built = _grammar_tokenizers.setdefault(tokenizer, {})
    stops = tuple(sorted(stop_ids))
    if stops not in built:
        built[stops] = from_tokenizer(tokenizer, eos_token=list(stops) or None)  # type: ignore[arg-type]
    return built[stops]


def schema_matcher(
    schema: dict[str, Any], tokenizer: PreTrainedTokenizerBase, stop_ids: Collection[int]
) -> LLMatcher:
    """A matcher that allows exactly the token sequences spelling JSON valid against ``schema``."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"json_schema is not usable: {exc}") from None
    matcher = LLMatcher(grammar_tokenizer(tokenizer, stop_ids), grammar, log_level=0)
    if matcher.is_error():
        raise SchemaError(f"json_schema is not usable: {matcher.get_error()}")
    return matcher


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Text of a token sequence, special tokens left out."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    assert isinstance(text, str)  # a flat id list decodes to one string
    return text


class Sampler:
    """Picks the tokens of one request and turns them into text, honouring stop and choices."""

    def __init__(
        self,
        params: SamplingParams,
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: Collection[int] | None = None,
    ) -> None:
        import torch  # here, not at the top: clients import SamplingParams without torch

        self.params = params
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.stop_ids = (
            set(stop_ids) if stop_ids is not None else ({eos} if eos is not None else set())
        )
        self.generator = torch.Generator()  # on the CPU: same seed, same tokens on any device
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self.tokens: list[int] = []
        self.finished = False
        self.finish_reason: FinishReason | None = None
        self._text = ""  # decoded so far (stop string cut off)
        self._sent = 0  # characters of _text already returned by `accept`
        self._prefix = self._read = 0  # incremental decoding window over self.tokens
        # Each choice as its canonical token sequence: the model scores the tokenisation it
        # was trained on, where letting e.g. "L"+"ondon" compete with "Paris" skews the pick.
        self._choices = {
            tuple(tokenizer.encode(c, add_special_tokens=False)) for c in params.choices
        }
        self._schema = (
            None
            if params.json_schema is None
            else schema_matcher(params.json_schema, tokenizer, self.stop_ids)
        )

    @property
    def text(self) -> str:
        """All text returned by `accept` so far."""
        return self._text[: self._sent]

    def allowed(self) -> list[int] | None:
        """Token ids that keep the output on the way to some choice; None when unconstrained."""
        if not self._choices:
            return None
        done, n = tuple(self.tokens), len(self.tokens)
        ids = {c[n] for c in self._choices if len(c) > n and c[:n] == done}
        if done in self._choices:
            ids |= self.stop_ids  # a complete choice that a longer one extends may end here
        return sorted(ids)

    def pick(self, logits: torch.Tensor) -> int:
        """Choose the next token from next-token logits [V]."""
        import torch

        p = self.params
        scores = logits.detach().float().cpu().view(-1)
        if (allowed := self.allowed()) is not None:
            masked = torch.full_like(scores, -math.inf)
            masked[allowed] = scores[allowed]
            scores = masked
        elif self._schema is not None:
            # one byte per token of the grammar's vocabulary, 0 = not allowed
            bias = torch.frombuffer(bytearray(self._schema.compute_logit_bias()), dtype=torch.uint8)
            allowed_ids = torch.zeros(scores.numel(), dtype=torch.bool)
            n = min(bias.numel(), scores.numel())
            allowed_ids[:n] = bias[:n] != 0
            scores = scores.masked_fill(~allowed_ids, -math.inf)
        if p.temperature == 0:
            return int(scores.argmax())
        scores = scores / p.temperature
        if 0 < p.top_k < scores.numel():
            scores[scores < scores.topk(p.top_k).values[-1]] = -math.inf
        if p.top_p < 1:
            ordered, order = scores.sort(descending=True)
            probs = ordered.softmax(-1)
            # Drop a token once the tokens before it already reach top_p; the first always stays.
            drop = probs.cumsum(-1) - probs >= p.top_p
            scores[order[drop]] = -math.inf
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))

    def accept(self, token: int) -> str:
        """Record a generated token; return the text that became final (may be empty)."""
        if self.finished:
            raise RuntimeError("this request has finished; start a new Sampler")
        ended = token in self.stop_ids
        if not ended:
            self.tokens.append(token)
            ended = tuple(self.tokens) in self._choices and not self._extendable()
            if self._schema is not None:
                self._schema.consume_token(token)
                ended = self._schema.is_stopped()  # complete, and nothing may follow
        reason: FinishReason | None = "stop" if ended else None
        if reason is None and len(self.tokens) >= self.params.max_tokens:
            reason = "length"
        self._text += self._decode_new(final=reason is not None)
        stops = (i for s in self.params.stop if (i := self._text.find(s, self._sent)) >= 0)
        if (cut := min(stops, default=-1)) >= 0:
            self._text, reason = self._text[:cut], "stop"
        if reason is None:
            return self._release(len(self._text) - self._held_back())
        self.finished, self.finish_reason = True, reason
        return self._release(len(self._text))

    def _extendable(self) -> bool:
        """Whether a longer choice continues the current (complete) one, which can still end."""
        n = len(self.tokens)
        return bool(self.stop_ids) and any(
            len(c) > n and list(c[:n]) == self.tokens for c in self._choices
        )

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        tail = self._text[self._sent :]
        for n in range(min(len(tail), max(map(len, self.params.stop), default=0)), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.params.stop):
                return n
        return 0

    def _decode_new(self, final: bool) -> str:
        """Text added by the latest tokens; waits while a character is incomplete."""
        before = decode(self.tokenizer, self.tokens[self._prefix : self._read])
        after = decode(self.tokenizer, self.tokens[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before) :]

    def _release(self, end: int) -> str:
        """Mark text up to `end` as returned and return the new part."""
        delta, self._sent = self._text[self._sent : end], max(self._sent, end)
        return delta
