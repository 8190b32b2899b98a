"""Sampler: greedy / seeded sampling, stop strings across tokens, the choices constraint."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from engine import Model, Sampler, SamplingParams
from engine.sampling import SchemaError


def random_logits(n: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(vocab, generator=gen) * 3 for _ in range(n)]


def char_tokens(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One token per character (more for multi-byte ones): stop strings must span tokens."""
    return [t for ch in text for t in tokenizer.encode(ch)]


def feed(sampler: Sampler, tokens: list[int]) -> list[str]:
    """Accept tokens until the sampler finishes; return each call's delta."""
    deltas = []
    for token in tokens:
        deltas.append(sampler.accept(token))
        if sampler.finished:
            break
    return deltas


def generate(sampler: Sampler, logits: list[torch.Tensor]) -> str:
    """Drive the sampler over canned logits, as the engine drives it over model logits."""
    text = ""
    for step in logits:
        text += sampler.accept(sampler.pick(step))
        if sampler.finished:
            return text
    raise AssertionError("did not finish")


def real_generation(
    model: Model, tokenizer: Any, question: str, params: SamplingParams
) -> tuple[str, Sampler]:
    """The model's answer to one user message, decoded token by token under ``params``."""
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    cache = model.new_cache()
    logits = model.prefill(ids, cache, last_only=True)[0]
    sampler = Sampler(params, tokenizer)
    text = ""
    while not sampler.finished:
        token = sampler.pick(logits)
        text += sampler.accept(token)
        logits = model.decode_one_token(token, cache)
    return text, sampler


def test_greedy_is_argmax(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    sampler = Sampler(SamplingParams(temperature=0), tiny_tokenizer)
    for logits in random_logits(20, 320):
        assert sampler.pick(logits) == int(logits.argmax())


def test_same_seed_same_tokens(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    logits = random_logits(50, 320)

    def tokens(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=seed), tiny_tokenizer)
        return [sampler.pick(step) for step in logits]

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k=1", "top_p=0"])
def test_narrowest_filters_are_greedy(
    tiny_tokenizer: PreTrainedTokenizerFast, params: dict[str, Any]
) -> None:
    sampler = Sampler(SamplingParams(temperature=1.5, seed=1, **params), tiny_tokenizer)
    for logits in random_logits(30, 320, seed=2):
        assert sampler.pick(logits) == int(logits.argmax())


def test_top_k_and_top_p_only_pick_from_the_head(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    logits = random_logits(1, 320, seed=3)[0]
    top5 = set(logits.topk(5).indices.tolist())
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=5, seed=0), tiny_tokenizer)
    assert {sampler.pick(logits) for _ in range(300)} <= top5
    probs = logits.softmax(-1).sort(descending=True)
    nucleus = set(probs.indices[: int((probs.values.cumsum(0) < 0.5).sum()) + 1].tolist())
    sampler = Sampler(SamplingParams(top_p=0.5, seed=0), tiny_tokenizer)
    assert {sampler.pick(logits) for _ in range(300)} <= nucleus


def test_temperature_sampling_follows_the_softmax(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    logits = torch.full((320,), -1e9)
    logits[[10, 11, 12]] = torch.tensor([0.0, 1.0, 2.0])
    sampler = Sampler(SamplingParams(seed=123), tiny_tokenizer)
    picks = [sampler.pick(logits) for _ in range(3000)]
    observed = torch.tensor([picks.count(t) / 3000 for t in (10, 11, 12)])
    assert torch.allclose(observed, logits[[10, 11, 12]].softmax(-1), atol=0.04)


def test_stop_string_split_across_tokens(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """Text that might begin a stop string is held back; the stop string is never shown."""
    sampler = Sampler(SamplingParams(stop=["STOP"], max_tokens=100), tiny_tokenizer)
    deltas = feed(sampler, char_tokens(tiny_tokenizer, "Go ST! STOP now"))
    assert "".join(deltas) == "Go ST! "
    assert sampler.text == "Go ST! "
    assert (sampler.finished, sampler.finish_reason) == (True, "stop")
    assert deltas[3:5] == ["", ""]  # "S", "T" held back while they could start "STOP"
    assert deltas[5] == "ST!"  # released once "!" rules the stop string out


def test_earliest_stop_string_wins(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    sampler = Sampler(SamplingParams(stop=["end.", "The e"], max_tokens=100), tiny_tokenizer)
    assert "".join(feed(sampler, tiny_tokenizer.encode("Done. The end. More"))) == "Done. "


def test_eos_and_max_tokens_finish(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tokens = tiny_tokenizer.encode("yes please")
    sampler = Sampler(SamplingParams(max_tokens=50), tiny_tokenizer)
    text = "".join(feed(sampler, [*tokens, tiny_tokenizer.eos_token_id, *tokens]))
    assert (text, sampler.finish_reason) == ("yes please", "stop")
    sampler = Sampler(SamplingParams(max_tokens=3, stop=["zzz"]), tiny_tokenizer)
    many = char_tokens(tiny_tokenizer, "abcdef")
    assert ("".join(feed(sampler, many)), sampler.finish_reason) == ("abc", "length")
    with pytest.raises(RuntimeError, match="finished"):
        sampler.accept(many[0])


def test_multibyte_characters_are_never_cut(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tokens = char_tokens(tiny_tokenizer, "café 東京 🙂!")
    assert len(tokens) > len("café 東京 🙂!")  # some characters are several byte tokens
    sampler = Sampler(SamplingParams(max_tokens=100), tiny_tokenizer)
    deltas = feed(sampler, tokens)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "café 東京 🙂!"


@pytest.mark.parametrize("temperature", [0.0, 1.0, 3.0])
def test_choices_always_yield_one_of_the_choices(
    tiny_tokenizer: PreTrainedTokenizerFast, temperature: float
) -> None:
    choices = ["yes", "yes please", "no", "maybe", "Paris", "東京"]
    results = set()
    for seed in range(40):
        params = SamplingParams(temperature=temperature, seed=seed, choices=choices)
        sampler = Sampler(params, tiny_tokenizer)
        text = generate(sampler, random_logits(30, 320, seed=seed))
        assert text in choices
        assert sampler.finish_reason == "stop"
        results.add(text)
    if temperature > 0:
        assert len(results) > 2  # the constraint restricts, it does not decide


def test_choice_that_prefixes_another_ends_without_a_stop_token(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """With no end-of-sequence token the shorter choice is taken as soon as it is complete."""
    params = SamplingParams(temperature=0, choices=["yes", "yes please"])
    sampler = Sampler(params, tiny_tokenizer, stop_ids=[])
    assert generate(sampler, random_logits(30, 320)) == "yes"


def test_sampling_params_validate_and_travel_as_msgpack() -> None:
    params = SamplingParams(temperature=0.5, top_k=3, seed=9, stop=["\n"], choices=["a", "b"])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams) == params
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"stop": [""]}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"top_k": -2}', type=SamplingParams)


@pytest.mark.slow
def test_real_model_answers_with_one_of_the_choices(real: tuple[Model, Any]) -> None:
    model, tokenizer = real
    question = "What is the capital of France? Answer with one city."
    choices = ["Paris", "London", "Berlin", "Madrid"]
    text, _ = real_generation(
        model, tokenizer, question, SamplingParams(temperature=0, choices=choices)
    )
    assert text == "Paris"
    for seed in range(10):  # random logits over the real 49k vocabulary
        sampler = Sampler(SamplingParams(seed=seed, choices=choices), tokenizer)
        assert generate(sampler, random_logits(10, model.args.vocab_size, seed)) in choices


@pytest.mark.slow
def test_real_model_greedy_generation_stops_on_a_stop_string(real: tuple[Model, Any]) -> None:
    model, tokenizer = real
    params = SamplingParams(temperature=0, max_tokens=40, stop=["Paris"])
    text, sampler = real_generation(model, tokenizer, "What is the capital of France?", params)
    assert sampler.finish_reason == "stop"
    assert text == "The capital of France is "


ROUTE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "agent": {"enum": ["coder", "search", "rag"]},
        "steps": {"type": "integer", "minimum": 0, "maximum": 9},
        "done": {"type": "boolean"},
    },
    "required": ["agent", "steps", "done"],
    "additionalProperties": False,
}


def valid_route(text: str) -> bool:
    value = msgspec.json.decode(text)
    return (
        set(value) == {"agent", "steps", "done"}
        and value["agent"] in ("coder", "search", "rag")
        and type(value["steps"]) is int
        and 0 <= value["steps"] <= 9
        and type(value["done"]) is bool
    )


@pytest.mark.parametrize("seed", range(8))
def test_json_schema_output_is_valid_whatever_the_logits(
    tiny_tokenizer: PreTrainedTokenizerFast, seed: int
) -> None:
    """Random logits would spell anything; the mask leaves only schema-valid JSON."""
    sampler = Sampler(
        SamplingParams(seed=seed, max_tokens=200, json_schema=ROUTE_SCHEMA), tiny_tokenizer
    )
    text = generate(sampler, random_logits(200, 320, seed))
    assert sampler.finish_reason == "stop"
    assert valid_route(text), text


def test_json_schema_greedy_follows_the_logits_inside_the_mask(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """Greedy under a schema picks the best allowed token, not just any allowed one."""
    sampler = Sampler(SamplingParams(temperature=0, json_schema=ROUTE_SCHEMA), tiny_tokenizer)
    logits = torch.zeros(320)
    first = sampler.pick(logits)
    assert tiny_tokenizer.decode([first]).startswith("{")
    favoured = torch.zeros(320)
    favoured[first] = -5.0  # the only allowed tokens are '{'-led: still picked, being allowed
    assert sampler.pick(favoured) == first


def test_choices_and_json_schema_together_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="not both"):
        msgspec.convert({"choices": ["a"], "json_schema": {"type": "string"}}, SamplingParams)


def test_an_unusable_json_schema_is_a_schema_error(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(SchemaError, match="json_schema is not usable"):
        Sampler(SamplingParams(json_schema={"type": "no-such-type"}), tiny_tokenizer)


@pytest.mark.slow
def test_real_model_fills_a_json_schema(real: tuple[Model, Any]) -> None:
    model, tokenizer = real
    params = SamplingParams(temperature=0, max_tokens=60, json_schema=ROUTE_SCHEMA)
    question = "Which agent writes Python code? Answer in JSON."
    text, sampler = real_generation(model, tokenizer, question, params)
    assert sampler.finish_reason == "stop"
    assert valid_route(text), text
