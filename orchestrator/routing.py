"""Which agents a user turn needs: small talk (none), or coder / search / rag.

Small talk is recognised by keywords, without a model round trip. Other turns ask the
engine, with decoding constrained to a fixed set of choices, and fall back to a
deterministic keyword router when the engine is unreachable or answers nothing
usable. Every decision says which router made it.
"""

from __future__ import annotations

import re
from typing import Literal, Protocol

import msgspec

from engine.protocol import Message
from engine.sampling import SamplingParams

from . import prompts

Method = Literal["small_talk", "model", "keyword"]

# what the model may answer, and the agents each choice means
CHOICES: dict[str, tuple[str, ...]] = {
    "coder": ("coder",),
    "search": ("search",),
    "rag": ("rag",),
    "search+rag": ("search", "rag"),
    "none": (),
}


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """A routing decision: which agents, each with its sub-task text."""

    agents: list[str]
    subtasks: dict[str, str]
    method: Method
    raw: str = ""  # what the model answered, for the record
    confident: bool = True  # False when the keyword router only guessed


SMALL_TALK = re.compile(
    r"^\s*(hi|hello|hey|yo|hiya|good (morning|afternoon|evening)|thanks?( you)?|thank you|"
    r"ok(ay)?|cool|great|nice|bye|goodbye|see you|how are you|who are you|what'?s up|"
    r"how'?s it going|nice to meet you)\b[\s!.?,]*(there|chorus|again|so much|a lot)?[\s!.?]*$",
    re.IGNORECASE,
)
# chit-chat that does not fit a one-line greeting: about the assistant, or pleasantries
CHIT_CHAT = re.compile(
    r"^\s*(hi|hello|hey|thanks|thank you|good (morning|afternoon|evening))\b[^?]*[.!]?\s*$|"
    r"\b(about yourself|who are you|your day|how are you|nice to meet|that was (helpful|great))\b",
    re.IGNORECASE,
)
CODE_WORDS = re.compile(
    r"\b(compute|calculate|evaluate|run|execute|script|program|simulate|sum of|product of|"
    r"factorial|fibonacci|primes?|sort|plot|convert|how many|count the|reverse the|"
    r"what is \d|power of|using python)\b",
    re.IGNORECASE,
)
FIND_WORDS = re.compile(
    r"\b(where|find|look up|search|which (part|section)|section|documented|in the (docs|reference))\b",
    re.IGNORECASE,
)
EXPLAIN_WORDS = re.compile(
    r"\b(explain|what is|what are|what does|how do|how does|how to|why|describe|difference|"
    r"tell me about|meaning)\b",
    re.IGNORECASE,
)


def is_small_talk(text: str) -> bool:
    """Greetings, thanks and the like: the narrator answers with no task."""
    return bool(SMALL_TALK.match(text) or CHIT_CHAT.search(text)) or not text.strip()


def keyword_route(text: str) -> Route:
    """The deterministic fallback router."""
    if is_small_talk(text):
        return Route(agents=[], subtasks={}, method="small_talk")
    agents: list[str] = []
    if CODE_WORDS.search(text) or re.search(r"\d\s*[-+*/^%]\s*\(?\d", text):
        agents.append("coder")
    else:
        if FIND_WORDS.search(text):
            agents.append("search")
        if EXPLAIN_WORDS.search(text):
            agents.append("rag")
    confident = bool(agents)
    if not agents:
        agents = ["search", "rag"]  # when unsure, look it up rather than guess
    return Route(
        agents=agents, subtasks={a: text for a in agents}, method="keyword", confident=confident
    )


class Completer(Protocol):
    async def complete_text(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[Message] | None = None,
        background: bool = False,
    ) -> str: ...


async def model_route(engine: Completer, text: str, summary: str = "") -> Route:
    """Ask the model, constrained to ``CHOICES``; fall back to keywords on anything else.
    ``summary`` (the conversation so far, already fitted to a budget) lets a follow-up
    ("and where is that documented?") be routed with its context."""
    # a raw few-shot prompt (prompts/controller.md), the choices spelled as the examples
    # tokenize: " coder"
    params = SamplingParams(temperature=0, max_tokens=8, choices=[f" {c}" for c in CHOICES])
    context = f"Conversation so far: {' '.join(summary.split())}\n" if summary.strip() else ""
    prompt = prompts.render("controller", summary=context, user_text=" ".join(text.split())[:2000])
    raw = (await engine.complete_text(prompt, params)).strip()
    agents = CHOICES.get(raw)
    if agents is None:
        fallback = keyword_route(text)
        return Route(agents=fallback.agents, subtasks=fallback.subtasks, method="keyword", raw=raw)
    return Route(agents=list(agents), subtasks={a: text for a in agents}, method="model", raw=raw)
