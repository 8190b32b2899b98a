"""The corpus the search and RAG agents read, cut into passages.

A :class:`Corpus` is either the built-in one — the Python documentation bundled with
Python (``pydoc_data.topics``, one document per topic) plus this project's
``docs/*.md`` and ``README.md`` — or a user's own folders of text and markdown files
(``CHORUS_CORPUS``, or the agents' ``corpus`` argument). It names the files it reads
(:class:`Origin`); each file is split at its headings into sections and each section
into :class:`Chunk` passages of at most :data:`MAX_CHARS` characters, packed from
whole paragraphs where they fit.

A chunk's ``source`` says where it came from, in a form a person can follow:
``pydoc:topics/for`` for a Python topic, ``docs/bus.md#topics`` (the file, relative to
its folder, and the GitHub anchor of the nearest heading) for a markdown file.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runtime.errors import ConfigError
from runtime.paths import DataDir

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROMPTS_DIR = PROJECT_ROOT / "prompts"

# all-MiniLM-L6-v2 reads 256 word pieces at most; docs text runs ~3.6 characters per
# piece, so 800 characters plus a title still fit whole
MAX_CHARS = 800
# change when chunking changes: indexes built by another version are rebuilt
CHUNKER_VERSION = "1"

BUILTIN = "builtin"  # in CHORUS_CORPUS: the built-in corpus, next to the user's folders
TEXT_SUFFIXES = frozenset({".md", ".markdown", ".txt", ".rst"})
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})

OriginKind = Literal["pydoc", "markdown", "text"]


@dataclass(frozen=True)
class Chunk:
    """One passage: where it is from, the headings above it, and its text."""

    source: str  # pydoc:topics/for, docs/bus.md#topics
    title: str  # the headings above the passage, outermost first, joined by " › "
    text: str

    @property
    def embedded_text(self) -> str:
        """What a vector stands for: the title gives a short passage its context."""
        return f"{self.title}\n{self.text}" if self.title else self.text

    @property
    def digest(self) -> str:
        """Content hash of :attr:`embedded_text`, the key of cached vectors."""
        return hashlib.sha256(self.embedded_text.encode()).hexdigest()


@dataclass(frozen=True)
class Origin:
    """One file the corpus reads. ``key`` identifies it in an index; ``label`` is how
    its sources are named (a path relative to its folder)."""

    key: str
    path: Path
    kind: OriginKind
    label: str

    def chunks(self, data: bytes) -> list[Chunk]:
        """The passages of this file, given its bytes."""
        text = data.decode("utf-8", errors="replace")
        if self.kind == "pydoc":
            return [
                chunk
                for topic, body in pydoc_topics(text).items()
                for chunk in chunk_document(body, f"pydoc:topics/{topic}", markdown=False)
            ]
        return chunk_document(text, self.label, markdown=self.kind == "markdown", anchors=True)


@dataclass(frozen=True)
class Corpus:
    """What to index: the built-in corpus, user folders, or both."""

    dirs: tuple[Path, ...] = ()
    builtin: bool = True

    @classmethod
    def parse(cls, spec: str) -> Corpus:
        """``DIR[:DIR…]`` (``os.pathsep``-separated), where the word ``builtin`` adds the
        built-in corpus; an empty spec is the built-in corpus alone."""
        parts = [p.strip() for p in spec.split(os.pathsep) if p.strip()]
        if not parts:
            return cls()
        dirs = tuple(Path(p).expanduser().resolve() for p in parts if p != BUILTIN)
        for d in dirs:
            if not d.is_dir():
                raise ConfigError(
                    f"corpus folder {d} does not exist; set CHORUS_CORPUS to folders of "
                    f".md/.txt files separated by {os.pathsep!r} (or {BUILTIN!r})"
                )
        return cls(dirs=dirs, builtin=BUILTIN in parts)

    @classmethod
    def configured(cls, explicit: Corpus | str | os.PathLike[str] | None = None) -> Corpus:
        """The corpus to use: ``explicit`` if given, else ``CHORUS_CORPUS``, else built-in."""
        if isinstance(explicit, Corpus):
            return explicit
        if explicit is not None:
            return cls.parse(os.fspath(explicit))
        return cls.parse(os.environ.get("CHORUS_CORPUS", ""))

    def origins(self) -> list[Origin]:
        """Every file of the corpus, in a stable order."""
        found: list[Origin] = []
        if self.builtin:
            found.append(pydoc_origin())
            docs = sorted((PROJECT_ROOT / "docs").glob("*.md"))
            for path in [PROJECT_ROOT / "README.md", *docs]:
                if path.is_file():
                    found.append(file_origin(path, PROJECT_ROOT))
        for root in self.dirs:
            found.extend(file_origin(path, root) for path in walk_text_files(root))
        return found


def pydoc_origin() -> Origin:
    """The ``pydoc_data.topics`` module of the running Python, read as a file."""
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or spec.origin is None:
        raise ConfigError("this Python has no pydoc_data.topics; use CHORUS_CORPUS=DIR instead")
    return Origin("pydoc:topics", Path(spec.origin), "pydoc", "pydoc:topics")


def file_origin(path: Path, root: Path) -> Origin:
    """A text or markdown file, its sources named relative to ``root``."""
    kind: OriginKind = "markdown" if path.suffix.lower() in MARKDOWN_SUFFIXES else "text"
    return Origin(str(path.resolve()), path, kind, path.relative_to(root).as_posix())


def walk_text_files(root: Path) -> Iterator[Path]:
    """Text and markdown files under ``root``, hidden files and folders left out."""
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if not name.startswith(".") and path.suffix.lower() in TEXT_SUFFIXES:
                yield path


def pydoc_topics(source: str) -> dict[str, str]:
    """The ``topics`` dict of a ``pydoc_data/topics.py`` file, read without importing it."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    raise ConfigError("pydoc_data/topics.py has no `topics = {...}`; this Python is unusual")


# -- sections and chunks -----------------------------------------------------------------

ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
UNDERLINE = re.compile(r"^([=\-~*^\"+#])\1{2,}\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


@dataclass(frozen=True)
class Section:
    """The text under one heading (``headings``: the path to it, outermost first)."""

    headings: tuple[str, ...]
    body: str


def split_sections(text: str, *, markdown: bool) -> list[Section]:
    """Cut a document at its headings: ``#`` and setext headings in markdown, RST-style
    underlined titles otherwise (levels in order of first appearance, as RST does).
    Headings inside code fences are text."""
    lines = text.splitlines()
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    body: list[str] = []
    underline_levels: dict[str, int] = {}
    in_fence = False

    def close(next_heading: tuple[int, str] | None) -> None:
        content = "\n".join(body).strip("\n")
        if content.strip():
            sections.append(Section(tuple(h for _, h in stack), content))
        body.clear()
        if next_heading is not None:
            level = next_heading[0]
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append(next_heading)

    for line in lines:
        if markdown and FENCE.match(line):
            in_fence = not in_fence
        if in_fence:
            body.append(line)
            continue
        if markdown and (atx := ATX_HEADING.match(line)):
            close((len(atx.group(1)), atx.group(2).strip()))
            continue
        underline = UNDERLINE.match(line)
        title = body[-1].strip() if body else ""
        one_line_paragraph = len(body) < 2 or not body[-2].strip()
        if underline and title and one_line_paragraph and not FENCE.match(body[-1]):
            char = underline.group(1)
            if markdown and char in "=-":
                level = 1 if char == "=" else 2
            elif not markdown and len(line.strip()) >= len(title):
                level = underline_levels.setdefault(char, len(underline_levels) + 1)
            else:
                body.append(line)
                continue
            body.pop()
            close((level, title))
            continue
        body.append(line)
    close(None)
    return sections


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def split_text(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Pack whole paragraphs into pieces of at most ``max_chars``; a longer paragraph is
    cut at line ends, and a longer line at spaces."""
    pieces: list[str] = []
    current = ""
    for paragraph in (p.strip("\n") for p in re.split(r"\n\s*\n", text)):
        if not paragraph.strip():
            continue
        for part in _fit(paragraph, max_chars):
            if current and len(current) + 2 + len(part) <= max_chars:
                current = f"{current}\n\n{part}"
            else:
                if current:
                    pieces.append(current)
                current = part
    if current:
        pieces.append(current)
    return pieces


def _fit(paragraph: str, max_chars: int) -> list[str]:
    """A paragraph as parts of at most ``max_chars``: whole if it fits, else by lines."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    parts: list[str] = []
    current = ""
    for line in paragraph.split("\n"):
        for piece in _cut_line(line, max_chars):
            if current and len(current) + 1 + len(piece) <= max_chars:
                current = f"{current}\n{piece}"
            else:
                if current:
                    parts.append(current)
                current = piece
    if current:
        parts.append(current)
    return parts


def _cut_line(line: str, max_chars: int) -> list[str]:
    pieces: list[str] = []
    while len(line) > max_chars:
        cut = line.rfind(" ", 0, max_chars + 1)
        cut = cut if cut > max_chars // 2 else max_chars
        pieces.append(line[:cut].rstrip())
        line = line[cut:].lstrip()
    return [*pieces, line] if line else pieces


def chunk_document(
    text: str, label: str, *, markdown: bool, anchors: bool = False, max_chars: int = MAX_CHARS
) -> list[Chunk]:
    """The passages of one document. ``anchors``: name each source ``label#anchor`` after
    its nearest heading (file documents); otherwise every passage's source is ``label``."""
    chunks: list[Chunk] = []
    seen_anchors: dict[str, int] = {}
    for section in split_sections(text, markdown=markdown):
        source = label
        if anchors and section.headings:
            anchor = slug(section.headings[-1])
            n = seen_anchors.get(anchor, 0)
            seen_anchors[anchor] = n + 1
            source = f"{label}#{anchor}" + (f"-{n}" if n else "")
        title = " › ".join(section.headings) if section.headings else label
        chunks.extend(Chunk(source, title, piece) for piece in split_text(section.body, max_chars))
    return chunks


# -- where things live -------------------------------------------------------------------


def index_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<data dir>/index``: where the search index and cached vectors are kept. The
    data dir is ``data_dir``, else ``CHORUS_DATA_DIR``, else ``./data``."""
    path = DataDir.at(data_dir).root / "index"
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_prompt(name: str) -> dict[str, str]:
    """The ``## section`` blocks of ``prompts/<name>.md`` (text above the first is notes
    for people). Fill a block's ``{slots}`` with :func:`fill`."""
    path = PROMPTS_DIR / f"{name}.md"
    sections: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            if current is not None:
                sections[current] = "\n".join(lines).strip()
            current, lines = line[3:].strip(), []
        else:
            lines.append(line)
    if current is not None:
        sections[current] = "\n".join(lines).strip()
    return sections


def fill(template: str, slots: Mapping[str, object]) -> str:
    """``template`` with its ``{name}`` slots filled; a slot without a value is an error
    naming it, and values are inserted as they are (braces in them are safe)."""
    wanted = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    missing = wanted - slots.keys()
    if missing:
        raise KeyError(f"prompt slots without a value: {', '.join(sorted(missing))}")
    return template.format_map(slots)
