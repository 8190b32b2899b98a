"""Prompt templates under ``prompts/``: named slots filled by code, and the playbooks."""

from __future__ import annotations

import re
import string
from functools import cache
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent.parent / "prompts"


class PromptError(Exception):
    """A template is missing, or a slot was left unfilled or unknown."""


@cache
def template(name: str | Path) -> str:
    """The text of ``prompts/<name>.md``, or of the file ``name`` when it is a Path (an
    operator's own prompt, e.g. a candidate narrator's)."""
    path = name if isinstance(name, Path) else PROMPT_DIR / f"{name}.md"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptError(f"prompt template {path} is missing ({exc})") from exc


def slots(text: str) -> set[str]:
    """The named slots of a template."""
    return {field for _, field, _, _ in string.Formatter().parse(text) if field}


def render(name: str | Path, **values: str) -> str:
    """Fill every slot of ``prompts/<name>.md`` (or of the file ``name``); a missing or
    unknown slot is an error."""
    text = template(name)
    wanted = slots(text)
    if missing := wanted - values.keys():
        raise PromptError(f"prompt {name!r} needs slots {sorted(missing)}")
    if extra := values.keys() - wanted:
        raise PromptError(f"prompt {name!r} has no slots {sorted(extra)}")
    return text.format(**values)


@cache
def playbooks() -> dict[str, str]:
    """Playbook name -> the line the user is told (with ``{reason}`` slots)."""
    found: dict[str, str] = {}
    for match in re.finditer(r"^## (\w+)\n+> (.+)$", template("playbooks"), re.MULTILINE):
        found[match.group(1)] = match.group(2).strip()
    return found


def playbook(name: str, reason: str = "") -> str:
    """The user-facing line of a playbook."""
    line = playbooks().get(name)
    if line is None:
        raise PromptError(f"no playbook named {name!r}; see prompts/playbooks.md")
    return line.replace("{reason}", reason or "an unexpected error").strip()
