"""Prompt templates, the token budget, and the routers."""

from __future__ import annotations

from typing import Any

import pytest

from engine.sampling import SamplingParams
from orchestrator import prompts
from orchestrator.budget import BudgetError, Section, fit
from orchestrator.routing import CHOICES, Route, is_small_talk, keyword_route, model_route

SAMPLE = {
    "summary": "The user asked about for loops; search found the reference section.",
    "recent_turns": "user: what is a for loop?\nchorus: It repeats a block for each item.",
    "task_states": "search-1 succeeded, rag-2 running 4 s",
    "user_text": "And how do I break out of one early?",
    "kind": "result",
    "cover": "rag-2: result: use the break statement [1]",
    "max_words": "80",
}


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("name", ["controller", "narrator", "narrator_cue", "summarize"])
def test_every_template_renders_with_all_slots_filled(name: str) -> None:
    text = prompts.template(name)
    values = {slot: SAMPLE[slot] for slot in prompts.slots(text)}
    rendered = prompts.render(name, **values)
    assert "{" not in rendered and "}" not in rendered
    for value in values.values():
        assert value in rendered


def test_missing_or_unknown_slots_are_errors() -> None:
    with pytest.raises(prompts.PromptError, match="needs slots"):
        prompts.render("narrator_cue", user_text="x")
    with pytest.raises(prompts.PromptError, match="has no slots"):
        prompts.render("narrator", summary="", extra="x")


def test_every_playbook_has_a_line_for_the_user() -> None:
    books = prompts.playbooks()
    for name in (
        "engine_down",
        "agent_crashed",
        "task_failed",
        "task_timeout",
        "input_rejected",
        "storage_failed",
    ):
        assert books[name]
    assert "disk full" in prompts.playbook("storage_failed", "disk full")
    assert "{reason}" not in prompts.playbook("task_failed")


def test_budget_shrinks_low_priority_first_and_never_cuts_kept_sections() -> None:
    old_turns = "\n".join(f"turn {i}: " + "word " * 20 for i in range(30))
    sections = [
        Section("summary", "a short summary of earlier turns", priority=2, min_tokens=5),
        Section("turns", old_turns, priority=1, min_tokens=10),
        Section("user", "the newest user turn stays whole", keep=True),
        Section("cue", "the cue stays whole too", keep=True),
    ]
    out = fit(sections, budget=80, count=words)
    assert out["user"] == sections[2].text and out["cue"] == sections[3].text
    assert out["summary"] == sections[0].text
    assert sum(words(t) for t in out.values()) <= 80
    assert out["turns"].startswith("…") and out["turns"].endswith("word ")  # the newest part kept


def test_budget_drops_a_section_below_its_minimum_and_refuses_the_impossible() -> None:
    sections = [Section("turns", "x " * 50, min_tokens=40), Section("user", "y " * 20, keep=True)]
    assert fit(sections, budget=30, count=words)["turns"] == ""
    with pytest.raises(BudgetError):
        fit([Section("user", "y " * 20, keep=True)], budget=10, count=words)


@pytest.mark.slow
def test_rendered_prompts_fit_the_budget_in_real_tokens() -> None:
    from engine.weights import converted_dir, default_model_path, load_model

    load_model(device="cpu")  # makes sure the converted tokenizer exists
    from engine.weights import load_tokenizer

    tokenizer = load_tokenizer(converted_dir(default_model_path()))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    long_turns = "\n".join(
        f"user: question {i}\nchorus: answer {i} " + "detail " * 30 for i in range(40)
    )
    budget = 512
    fitted = fit(
        [
            Section("summary", SAMPLE["summary"], priority=2, min_tokens=10),
            Section("recent_turns", long_turns, priority=1, min_tokens=50),
        ],
        budget - count(prompts.template("summarize")),
        count,
    )
    rendered = prompts.render("summarize", max_words="80", **fitted)
    assert count(rendered) <= budget
    assert SAMPLE["summary"] in rendered and "question 39" in rendered  # the newest turns kept
    assert "question 0\n" not in rendered  # the oldest cut


async def test_the_model_router_sees_the_conversation_summary_only_when_there_is_one() -> None:
    completer = FixedCompleter(" rag")
    await model_route(completer, "and the second one?")
    assert completer.prompt is not None and "Conversation so far" not in completer.prompt
    assert completer.prompt.endswith("Request: and the second one?\nHelper:")
    await model_route(completer, "and the second one?", summary=SAMPLE["summary"])
    assert f"Conversation so far: {SAMPLE['summary']}\nRequest:" in (completer.prompt or "")


@pytest.mark.parametrize(
    ("text", "agents"),
    [
        ("hello!", []),
        ("thanks so much", []),
        ("Compute 17 * 23 in Python", ["coder"]),
        ("Where is the assert statement documented?", ["search"]),
        ("Explain list comprehensions", ["rag"]),
    ],
)
def test_keyword_router(text: str, agents: list[str]) -> None:
    route = keyword_route(text)
    assert route.agents == agents and route.confident
    assert route.method == ("small_talk" if not agents else "keyword")
    assert is_small_talk(text) == (not agents)


def test_keyword_router_says_when_it_only_guessed() -> None:
    route = keyword_route("tell me something interesting about decorators")
    assert route.agents == ["search", "rag"] and not route.confident


class FixedCompleter:
    """Answers every completion with a fixed text (the model router's parser under test)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.params: SamplingParams | None = None
        self.prompt: str | None = None

    async def complete_text(
        self, prompt: str | None = None, params: SamplingParams | None = None, **_: Any
    ) -> str:
        self.params, self.prompt = params, prompt
        return self.answer


async def test_model_router_uses_a_valid_choice_and_constrains_decoding() -> None:
    completer = FixedCompleter(" search+rag")
    route = await model_route(completer, "explain slicing and where it is documented")
    assert route == Route(
        agents=["search", "rag"],
        subtasks={"search": route.subtasks["search"], "rag": route.subtasks["rag"]},
        method="model",
        raw="search+rag",
    )
    assert completer.params is not None and sorted(
        c.strip() for c in completer.params.choices
    ) == sorted(CHOICES)


async def test_model_router_falls_back_to_keywords_on_invalid_output() -> None:
    route = await model_route(FixedCompleter("banana"), "Compute 2 + 2")
    assert route.method == "keyword" and route.agents == ["coder"] and route.raw == "banana"
