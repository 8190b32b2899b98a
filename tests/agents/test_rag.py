"""Embedding with the real MiniLM, the vector cache, rank fusion, retrieval, and the RAG
agent as a real process: without the engine (extractive) and, slow, with it."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.base import Task, TaskResult
from agents.corpus import Chunk, Corpus, fill, read_prompt
from agents.rag import (
    DenseIndex,
    Embedder,
    Passage,
    RagAgent,
    Retriever,
    VectorCache,
    attribute,
    citations,
    fuse,
    trim,
)
from agents.search import SearchIndex
from runtime import messages as m
from runtime.paths import DataDir
from tests.agents.test_search import agent_process, run_task, write_notes
from tests.conftest import BrokerProcess, wait_for_engine

NOTES = {
    "kettle.md": (
        "# The Zorblax kettle\n\n"
        "The Zorblax kettle boils one litre of water in ninety seconds.\n\n"
        "## Cleaning\n\nDescale the kettle every month with white vinegar and rinse it twice.\n"
    ),
    "bicycle.md": (
        "# Bicycle care\n\nPump the tyres to four bar before every ride and oil the chain weekly.\n"
    ),
    "bread.md": "# Bread\n\nKnead the dough for ten minutes, then let it rise for an hour.\n",
}


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    """The real all-MiniLM-L6-v2, loaded once for the module (a few seconds)."""
    return Embedder()


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    return write_notes(tmp_path / "notes", NOTES)


def retriever_for(notes: Path, data_dir: Path, embedder: Embedder) -> Retriever:
    return Retriever(
        SearchIndex(data_dir / "search.sqlite", Corpus.parse(str(notes))),
        VectorCache(data_dir / "vectors.sqlite"),
        lambda: embedder,
    )


# -- embedding ---------------------------------------------------------------------------


def test_the_model_is_pooled_and_normalised_as_its_sentence_transformers_config_says(
    embedder: Embedder,
) -> None:
    assert embedder.normalize and embedder.max_length == 256 and embedder.dim == 384
    vectors = embedder.embed(["one sentence", "and another, a little longer one"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_similar_sentences_score_higher_than_unrelated_ones(embedder: Embedder) -> None:
    a, b, c = embedder.embed(
        [
            "How do I boil water for tea?",
            "What is the quickest way to heat water in a kettle?",
            "The stock market fell sharply on Tuesday.",
        ]
    )
    assert a @ b > 0.4 > a @ c


def test_padding_in_a_batch_does_not_change_a_sentence_vector(embedder: Embedder) -> None:
    alone = embedder.embed(["a short sentence"])[0]
    batched = embedder.embed(["a short sentence", "a much longer sentence " * 10])[0]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


# -- fusion and dense search -------------------------------------------------------------


def test_rank_fusion_puts_what_both_rankings_like_first() -> None:
    assert fuse([[1, 2, 3], [3, 1, 4]]) == [1, 3, 2, 4]
    scores = {1: 1 / 61 + 1 / 62, 3: 1 / 63 + 1 / 61}
    assert scores[1] > scores[3]  # the first place in one ranking weighs most
    assert fuse([[7, 8], []]) == [7, 8] and fuse([]) == []


def test_dense_index_ranks_by_cosine_similarity() -> None:
    matrix = np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)
    index = DenseIndex(np.array([10, 20, 30], dtype=np.int64), matrix)
    assert index.rank(np.array([0, 1], dtype=np.float32), 2) == [30, 20]
    assert index.rank(np.array([1, 0], dtype=np.float32), 10) == [10, 20, 30]


def test_trim_and_citations() -> None:
    assert trim("short", 100) == "short"
    cut = trim("word " * 100, 50)
    assert len(cut) <= 52 and cut.endswith(" …")
    assert citations("Boils fast [2]. Descale monthly [1, 2]. Also [7].", 3) == [2, 1]


def test_an_uncited_answer_is_attributed_to_the_passage_it_shares_most_words_with() -> None:
    passages = [
        Passage(1, Chunk("a.md#kettle", "Kettle", "The kettle boils water in ninety seconds."), 1),
        Passage(2, Chunk("b.md#bread", "Bread", "Knead the dough, then bake the bread."), 2),
    ]
    assert attribute("You should knead bread dough first.", passages) == 2
    assert attribute("The kettle is fast.", passages) == 1
    assert attribute("The answer is 10.", passages) is None


# -- retrieval ---------------------------------------------------------------------------


def test_vectors_are_cached_by_content_so_only_new_passages_are_embedded(
    notes: Path, tmp_path: Path, embedder: Embedder
) -> None:
    first = retriever_for(notes, tmp_path, embedder).refresh()
    assert first.passages == 4 and first.embedded == 4
    restarted = retriever_for(notes, tmp_path, embedder)
    assert restarted.refresh().embedded == 0  # a restart reads the cache
    (notes / "bread.md").write_text("# Bread\n\nBake at 220 degrees for thirty minutes.\n")
    assert restarted.refresh().embedded == 1
    assert restarted.refresh().embedded == 0


def test_each_method_finds_the_passage_and_hybrid_beats_a_lexical_miss(
    notes: Path, tmp_path: Path, embedder: Embedder
) -> None:
    retriever = retriever_for(notes, tmp_path, embedder)
    retriever.refresh()
    question = "How should I clean limescale out of my kettle?"
    for method in ("bm25", "dense", "hybrid"):
        assert retriever.rank_sources(question, method, 1) == ["kettle.md#cleaning"], method
    # no word in common with the passage: BM25 finds nothing, the vectors do
    paraphrase = "How hard should I inflate my wheels?"
    assert retriever.rank_sources(paraphrase, "bm25") == []
    assert retriever.rank_sources(paraphrase, "dense", 1) == ["bicycle.md#bicycle-care"]
    assert retriever.rank_sources(paraphrase, "hybrid", 1) == ["bicycle.md#bicycle-care"]
    passages = retriever.retrieve(question, "hybrid", 3)
    assert len({p.chunk.source for p in passages}) == len(passages) == 3


def test_the_rag_prompt_lists_numbered_sources_and_the_question() -> None:
    prompts = read_prompt("rag")
    source = fill(prompts["source"], {"n": 1, "title": "T", "source": "s.md#t", "text": "x"})
    assert source.startswith("[1] T (s.md#t)")
    user = fill(prompts["user"], {"sources": source, "question": "Why {braces}?"})
    assert "[1] T" in user and "Why {braces}?" in user
    assert "[1]" in prompts["system"]


# -- the agent ---------------------------------------------------------------------------


async def ask(
    agent: RagAgent, question: str, before_stop: Callable[[], object] = lambda: None
) -> tuple[TaskResult, list[m.TaskUpdate]]:
    """Run one task through the agent's hooks, as the host would; its result and progress."""
    updates: list[m.TaskUpdate] = []

    async def publish(topic: str, body: Any, task: str | None, conversation: str | None) -> None:
        if isinstance(body, m.TaskUpdate):
            updates.append(body)

    agent.attach(publish)
    await agent.on_start()
    try:
        result = await agent.on_task(Task(id="t1", kind="ask", text=question))
    finally:
        before_stop()
        await agent.on_stop()
    return result, updates


async def test_the_agent_retrieves_with_hybrid_and_without_engine_returns_the_passages(
    notes: Path, tmp_path: Path, embedder: Embedder
) -> None:
    agent = RagAgent(notes, tmp_path / "data")
    agent.retriever = retriever_for(notes, tmp_path / "data", embedder)
    result, _ = await ask(agent, "How do I descale the kettle?")
    assert result.data["retrieval"] == "hybrid" and "notes" not in result.data
    assert result.data["answer_method"] == "extractive" and result.data["answer"] == ""
    assert "engine" in result.data["engine_error"]
    assert result.sources[0] == "kettle.md#cleaning" and len(result.sources) == 3
    assert [p["source"] for p in result.data["passages"]] == result.sources
    assert result.data["passages"][0]["n"] == 1 and "vinegar" in result.data["passages"][0]["text"]
    assert "[1] The Zorblax kettle › Cleaning" in result.message


async def test_a_task_that_comes_before_the_vectors_are_built_uses_bm25_and_says_so(
    notes: Path, tmp_path: Path, embedder: Embedder
) -> None:
    gate = threading.Event()

    def slow_model() -> Embedder:
        gate.wait(20)
        return embedder

    agent = RagAgent(notes, tmp_path / "data", warmup_wait_s=0.2)
    agent.retriever = Retriever(
        SearchIndex(tmp_path / "search.sqlite", Corpus.parse(str(notes))),
        VectorCache(tmp_path / "vectors.sqlite"),
        slow_model,
    )
    result, updates = await ask(agent, "How do I descale the kettle?", before_stop=gate.set)
    assert result.data["retrieval"] == "bm25"
    assert "still building" in result.data["notes"][0]
    assert result.sources[0] == "kettle.md#cleaning"
    assert any("building the vector index" in u.message for u in updates)


# -- the agent as a real process ---------------------------------------------------------


async def test_the_agent_process_answers_a_task_with_passages_and_sources(
    data: DataDir, broker: BrokerProcess, notes: Path
) -> None:
    """BM25 keeps this process free of the model (seconds to load on a busy machine); the
    hybrid path is the in-process test above and the slow test below."""
    with agent_process(data, "rag", "agents.rag:RagAgent", notes, CHORUS_RAG_METHOD="bm25"):
        seen = await run_task(data, "rag", "How do I descale the kettle?", 30)
    result = seen[-1]
    assert result.state == "result", result.message
    assert result.data["retrieval"] == "bm25"
    assert result.data["answer_method"] == "extractive"
    assert result.sources[0] == "kettle.md#cleaning"
    assert [p["source"] for p in result.data["passages"]] == result.sources


@pytest.mark.slow
@pytest.mark.timeout(600)  # the engine and the agent load models; 200 tokens on a busy CPU
async def test_with_the_engine_the_answer_cites_its_numbered_sources(
    data: DataDir, broker: BrokerProcess, notes: Path, engine_process: subprocess.Popen[bytes]
) -> None:
    await wait_for_engine(data, engine_process, 120)
    with agent_process(data, "rag", "agents.rag:RagAgent", notes):
        seen = await run_task(
            data, "rag", "How long does the Zorblax kettle take to boil?", 450, deadline_s=440
        )
    result = seen[-1]
    assert result.state == "result", result.message
    assert result.data["answer_method"] == "generated", result.data.get("engine_error")
    assert result.data["retrieval"] == "hybrid"
    assert result.sources[0] == "kettle.md#the-zorblax-kettle" and len(result.sources) == 3
    assert result.message == result.data["answer"] and result.message
    # the model's own [n], or one attributed by word overlap when it forgot (it is 135M)
    assert result.data["cited"] and result.data["citations"] in ("model", "attributed")
    assert citations(result.message, len(result.sources)) == result.data["cited"]
