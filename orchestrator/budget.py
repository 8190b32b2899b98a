"""Fitting a prompt into a token budget, counted with the model's own tokenizer.

A prompt is built from sections, each with a priority and a minimum size. When the
whole does not fit, the lowest-priority sections shrink first (keeping their newest
part, down to their minimum), then are dropped; sections marked ``keep`` (the newest
user turn, the cue) are never cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Section:
    name: str
    text: str
    priority: int = 0  # higher survives longer
    min_tokens: int = 0  # shrink no further than this, then drop
    keep: bool = False  # never cut (the newest user turn, the cue)
    keep_end: bool = True  # when shrinking, keep the end (newest) rather than the start


class BudgetError(Exception):
    """Even the sections that may not be cut exceed the budget."""


def fit(sections: Sequence[Section], budget: int, count: CountTokens) -> dict[str, str]:
    """Section name -> its text after fitting all of them into ``budget`` tokens."""
    texts = {s.name: s.text for s in sections}
    sizes = {s.name: count(s.text) for s in sections}
    fixed = sum(sizes[s.name] for s in sections if s.keep)
    if fixed > budget:
        raise BudgetError(
            f"the sections that may not be cut need {fixed} tokens; the budget is {budget}"
        )
    over = sum(sizes.values()) - budget
    for s in sorted((s for s in sections if not s.keep), key=lambda s: s.priority):
        if over <= 0:
            break
        target = sizes[s.name] - over
        if target >= max(s.min_tokens, 1):
            texts[s.name] = _shrink(s.text, target, count, s.keep_end)
        else:
            texts[s.name] = ""
        over -= sizes[s.name] - count(texts[s.name])
    return texts


def _shrink(text: str, target: int, count: CountTokens, keep_end: bool) -> str:
    """The longest end (or start) of ``text`` within ``target`` tokens, cut at a line
    or word boundary, marked with an ellipsis."""
    lo, hi = 0, len(text)
    while lo < hi:  # binary search on characters: token counts grow with length
        mid = (lo + hi + 1) // 2
        piece = text[-mid:] if keep_end else text[:mid]
        if count("…" + piece) <= target:
            lo = mid
        else:
            hi = mid - 1
    piece = text[-lo:] if keep_end else text[:lo]
    if lo == 0:
        return ""
    return "…" + piece if keep_end else piece + "…"
