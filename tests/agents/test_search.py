"""The corpus, its chunking, the BM25 index and the search agent as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from agents.base import Task
from agents.corpus import (
    MAX_CHARS,
    Corpus,
    chunk_document,
    fill,
    read_prompt,
    slug,
    split_sections,
    split_text,
)
from agents.search import SearchAgent, SearchIndex, match_expression
from runtime import messages as m
from runtime.bus import Bus
from runtime.errors import ConfigError
from runtime.paths import DataDir
from tests.conftest import BrokerProcess

NOTES = {
    "cats.md": (
        "# Cats\n\nCats purr when they are content and sleep most of the day.\n\n"
        "## Feeding\n\nFeed a cat fish or chicken twice a day; cats need taurine.\n"
    ),
    "dogs.md": "# Dogs\n\nDogs bark at strangers and love long walks in the park.\n",
    "garden/tomatoes.txt": (
        "Tomatoes\n========\n\nTomato plants need full sun, deep watering and a stake.\n"
    ),
    ".hidden.md": "# Secret\n\nNot part of the corpus.\n",
    "image.png": "not text",
}


def write_notes(root: Path, notes: dict[str, str] = NOTES) -> Path:
    """A small corpus folder."""
    for name, text in notes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    return write_notes(tmp_path / "notes")


# -- corpus ------------------------------------------------------------------------------


def test_a_folder_corpus_lists_text_and_markdown_files_but_not_hidden_or_binary_ones(
    notes: Path,
) -> None:
    origins = Corpus.parse(str(notes)).origins()
    assert [o.label for o in origins] == ["cats.md", "dogs.md", "garden/tomatoes.txt"]
    assert [o.kind for o in origins] == ["markdown", "markdown", "text"]


def test_the_builtin_corpus_is_the_pydoc_topics_and_the_project_docs() -> None:
    origins = Corpus().origins()
    labels = [o.label for o in origins]
    assert labels[0] == "pydoc:topics" and "README.md" in labels
    assert any(label.startswith("docs/") and label.endswith(".md") for label in labels)
    pydoc = origins[0]
    chunks = pydoc.chunks(pydoc.path.read_bytes())
    sources = {c.source for c in chunks}
    assert {"pydoc:topics/for", "pydoc:topics/pass", "pydoc:topics/string-methods"} <= sources
    for_loop = next(c for c in chunks if c.source == "pydoc:topics/for")
    assert for_loop.title == 'The "for" statement' and "iterate" in for_loop.text


def test_the_corpus_comes_from_the_argument_then_chorus_corpus_then_the_builtin(
    notes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHORUS_CORPUS", raising=False)
    assert Corpus.configured() == Corpus()
    monkeypatch.setenv("CHORUS_CORPUS", f"{notes}{os.pathsep}builtin")
    assert Corpus.configured() == Corpus(dirs=(notes.resolve(),), builtin=True)
    assert Corpus.configured(notes) == Corpus(dirs=(notes.resolve(),), builtin=False)
    with pytest.raises(ConfigError, match="does not exist"):
        Corpus.configured(notes / "missing")


# -- chunking ----------------------------------------------------------------------------


def test_markdown_is_cut_at_headings_but_not_at_hashes_in_code_fences() -> None:
    text = (
        "Intro line.\n\n# Title\n\nBody.\n\n```sh\n# a shell comment\necho hi\n```\n\n"
        "## Part two\n\nMore.\n\nSetext\n------\n\nUnder setext.\n"
    )
    sections = split_sections(text, markdown=True)
    assert [s.headings for s in sections] == [
        (),
        ("Title",),
        ("Title", "Part two"),
        ("Title", "Setext"),
    ]
    assert "# a shell comment" in sections[1].body


def test_underlined_titles_nest_in_order_of_first_appearance() -> None:
    text = (
        "The thing\n*********\n\nAbout it.\n\nDetails\n=======\n\nMore.\n\n"
        "Finer\n-----\n\nFine.\n\nOther\n=====\n\nLast.\n"
    )
    sections = split_sections(text, markdown=False)
    assert [s.headings for s in sections] == [
        ("The thing",),
        ("The thing", "Details"),
        ("The thing", "Details", "Finer"),
        ("The thing", "Other"),
    ]


def test_long_sections_are_packed_from_whole_paragraphs_up_to_the_limit() -> None:
    paragraphs = [f"Paragraph {i} " + " ".join(["word"] * 30) for i in range(40)]
    pieces = split_text("\n\n".join(paragraphs), max_chars=MAX_CHARS)
    assert len(pieces) > 1 and all(len(p) <= MAX_CHARS for p in pieces)
    assert "\n\n".join(pieces).split("\n\n") == paragraphs  # none cut, none lost
    long_line = "x" * 50 + " " + "y" * 2000
    assert all(len(p) <= 300 for p in split_text(long_line, max_chars=300))


def test_file_sources_name_the_nearest_heading_with_github_anchors() -> None:
    chunks = chunk_document(
        "# Set up\n\nA.\n\n## Step 1: `make run`\n\nB.\n\n## Notes\n\nC.\n\n## Notes\n\nD.\n",
        "guide.md",
        markdown=True,
        anchors=True,
    )
    assert [c.source for c in chunks] == [
        "guide.md#set-up",
        "guide.md#step-1-make-run",
        "guide.md#notes",
        "guide.md#notes-1",
    ]
    assert chunks[1].title == "Set up › Step 1: `make run`"
    assert slug("Queries: `python -m runtime logs`") == "queries-python--m-runtime-logs"


# -- the index ---------------------------------------------------------------------------


def test_the_index_is_built_once_then_only_changed_files_are_reindexed(
    notes: Path, tmp_path: Path
) -> None:
    index = SearchIndex(tmp_path / "search.sqlite", Corpus.parse(str(notes)))
    first = index.update()
    assert (first.added, first.updated, first.unchanged) == (3, 0, 0) and first.chunks == 4
    again = index.update()
    assert not again.changed and again.unchanged == 3

    (notes / "dogs.md").write_text("# Dogs\n\nDogs herd sheep on hillside farms.\n")
    changed = index.update()
    assert (changed.updated, changed.unchanged, changed.changed_files) == (1, 2, ["dogs.md"])
    assert [h.source for h in index.search("sheep")] == ["dogs.md#dogs"]
    assert index.search("strangers") == []  # the old text is gone

    (notes / "garden" / "tomatoes.txt").unlink()
    (notes / "new.md").write_text("# New\n\nFresh notes about sheep.\n")
    moved = index.update()
    assert (moved.added, moved.removed) == (1, 1)
    assert index.search("tomato") == []


def test_a_touched_but_unchanged_file_is_not_reindexed(notes: Path, tmp_path: Path) -> None:
    index = SearchIndex(tmp_path / "search.sqlite", Corpus.parse(str(notes)))
    index.update()
    ids = {h.id for h in index.search("cats", 10, per_source=None)}
    path = notes / "cats.md"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    report = index.update()
    assert not report.changed and report.unchanged == 3
    assert {h.id for h in index.search("cats", 10, per_source=None)} == ids


def test_bm25_ranks_the_passage_about_the_query_first(notes: Path, tmp_path: Path) -> None:
    index = SearchIndex(tmp_path / "search.sqlite", Corpus.parse(str(notes)))
    index.update()
    hits = index.search("What should I feed my cat?", 5)
    assert hits[0].source == "cats.md#feeding" and "taurine" in hits[0].snippet
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert index.search("the and of", 5) == []  # nothing but stopwords


def test_bm25_finds_python_topics_in_the_builtin_corpus(tmp_path: Path) -> None:
    index = SearchIndex(tmp_path / "search.sqlite", Corpus())
    index.update()
    assert index.search("What does the pass statement do?", 3)[0].source == "pydoc:topics/pass"
    top = [h.source for h in index.search("for loop else clause break", 5)]
    assert "pydoc:topics/for" in top
    assert len(top) == len(set(top))  # one hit per source by default


def test_queries_with_fts_syntax_are_taken_as_plain_words() -> None:
    assert (
        match_expression('NOT "quoted" (x* OR y) -z: AND')
        == '"not" OR "quoted" OR "x" OR "y" OR "z"'
    )


def test_the_search_prompt_fills_its_slots() -> None:
    templates = read_prompt("search")
    assert "{query}" in templates["summary"]
    with pytest.raises(KeyError, match="count"):
        fill(templates["summary"], {"query": "q", "hits": ""})


# -- the agent as a real process ---------------------------------------------------------


@contextmanager
def agent_process(
    data: DataDir, name: str, impl: str, corpus: Path, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m runtime agent NAME`` on ``data``'s broker, reading ``corpus``."""
    argv = [sys.executable, "-m", "runtime", "agent", name, "--connect", str(data.root)]
    with (data.root / f"{name}.stderr").open("ab") as err:
        proc = subprocess.Popen(
            [*argv, "--impl", impl],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={
                **os.environ,
                "CHORUS_CORPUS": str(corpus),
                "CHORUS_DATA_DIR": str(data.root),
                **env,
            },
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


async def run_task(
    data: DataDir, agent: str, text: str, timeout: float, deadline_s: float = 120.0, **params: str
) -> list[m.TaskUpdate]:
    """Assign one task as the controller once the agent is up; its updates to the end."""
    seen: list[m.TaskUpdate] = []
    async with Bus("controller", data.read_endpoints(), data.keys) as bus:
        with bus.subscribe("task.update") as updates, bus.subscribe(f"heartbeat.{agent}") as beats:
            with anyio.fail_after(30):
                await beats.receive()
            await bus.publish(
                f"task.assign.{agent}",
                m.TaskAssign(
                    task="t1", kind="ask", text=text, deadline_s=deadline_s, params=params
                ),
                conversation="c1",
            )
            with anyio.fail_after(timeout):
                async for env in updates:
                    if isinstance(env.body, m.TaskUpdate) and env.body.task == "t1":
                        seen.append(env.body)
                        if env.body.state in ("result", "failed", "cancelled"):
                            break
    return seen


async def test_the_search_agent_answers_a_task_with_ranked_hits_and_sources(
    data: DataDir, broker: BrokerProcess, notes: Path
) -> None:
    with agent_process(data, "search", "agents.search:SearchAgent", notes):
        seen = await run_task(data, "search", "how often should cats be fed", 30)
    result = seen[-1]
    assert result.state == "result", result.message
    assert result.sources[0] == "cats.md#feeding"
    assert result.data["hits"][0]["source"] == "cats.md#feeding"
    assert set(result.data["hits"][0]) == {"source", "title", "snippet", "score"}
    assert "cats.md#feeding" in result.message
    assert (data.root / "index" / "search.sqlite").is_file()


async def test_a_corpus_setting_switches_the_corpus_and_a_bad_one_is_a_fault(
    notes: Path, tmp_path: Path
) -> None:
    published: list[tuple[str, object]] = []

    async def publish(topic: str, body: m.Body, task: str | None, conv: str | None) -> None:
        published.append((topic, body))

    agent = SearchAgent(corpus=notes, data_dir=tmp_path / "data")
    agent.name = "search"
    agent.attach(publish)
    await agent.on_config("corpus", str(tmp_path / "missing"))
    assert agent.corpus == Corpus.parse(str(notes))
    topic, body = published[-1]
    assert topic == "event.search" and isinstance(body, m.Fault) and "missing" in body.message
    other = write_notes(tmp_path / "other", {"owls.md": "# Owls\n\nOwls hunt at night.\n"})
    await agent.on_config("corpus", str(other))
    result = await agent.on_task(Task(id="t", kind="search", text="when do owls hunt"))
    assert result.sources == ["owls.md#owls"]
