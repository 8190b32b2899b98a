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


SMALL_TALK = re.compile(
    r"^\s*(hi|hello|hey|yo|hiya|good (morning|afternoon|evening)|thanks?( you)?|thank you|"
    r"ok(ay)?|cool|great|nice|bye|goodbye|see you|how are you|who are you|what'?s up|"
    r"how'?s it going|nice to meet you)\b[\s!.?,]*(there|chorus|again|so much|a lot)?[\s!.?]*$",
    re.IGNORECASE,
)
CODE_WORDS = re.compile(
    r"\b(compute|calculate|evaluate|run|execute|script|program|code|function|simulate|"
    r"sum of|product of|factorial|fibonacci|prime|sort|plot|convert|how many|what is \d)",
    re.IGNORECASE,
)
DOC_WORDS = re.compile(
    r"\b(what is|what are|what does|how do|how does|how to|explain|why|when|where|which|"
    r"documentation|docs|reference|meaning|difference|describe|tell me about|syntax|keyword|"
    r"statement|operator|module|method|python)\b",
    re.IGNORECASE,
)


def is_small_talk(text: str) -> bool:
    """Greetings, thanks and the like: the narrator answers with no task."""
    return bool(SMALL_TALK.match(text)) or not text.strip()


def keyword_route(text: str) -> Route:
    """The deterministic fallback router."""
    if is_small_talk(text):
        return Route(agents=[], subtasks={}, method="small_talk")
    agents: list[str] = []
    if CODE_WORDS.search(text) or re.search(r"\d\s*[-+*/^%]\s*\d", text):
        agents.append("coder")
    if DOC_WORDS.search(text) and not agents:
        agents += ["search", "rag"]
    if not agents:
        agents = ["search", "rag"]  # when unsure, look it up rather than guess
    return Route(agents=agents, subtasks={a: text for a in agents}, method="keyword")


ROUTER_PROMPT = (
    "You route requests to helpers. coder: computing, calculating or running Python. "
    "search: finding where something is documented. rag: explaining a topic from the "
    "documentation. search+rag: both. none: chit-chat needing no helper.\n"
    "Request: {text}\nHelper:"
)


class Completer(Protocol):
    async def complete_text(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[Message] | None = None,
    ) -> str: ...


async def model_route(engine: Completer, text: str) -> Route:
    """Ask the model, constrained to ``CHOICES``; fall back to keywords on anything else."""
    params = SamplingParams(temperature=0, max_tokens=8, choices=list(CHOICES))
    prompt = ROUTER_PROMPT.format(text=text.strip()[:2000])
    raw = (
        await engine.complete_text(messages=[Message(role="user", content=prompt)], params=params)
    ).strip()
    agents = CHOICES.get(raw)
    if agents is None:
        fallback = keyword_route(text)
        return Route(agents=fallback.agents, subtasks=fallback.subtasks, method="keyword", raw=raw)
    return Route(agents=list(agents), subtasks={a: text for a in agents}, method="model", raw=raw)
