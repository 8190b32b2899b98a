"""The search agent: BM25 lexical search over the corpus, with SQLite FTS5.

The index lives in ``<data dir>/index/search.sqlite``: an FTS5 table of passages
(Porter-stemmed, ``_`` kept inside words so ``__init__`` stays one term) and a table of
the files it was built from, with each file's mtime, size and SHA-256. Every task first
brings the index up to date — a file whose mtime and size are unchanged is skipped, one
whose content hash is unchanged only has its stamp renewed, and only a changed, new or
removed file has its passages replaced — so the first task builds it (about a second for
the built-in corpus) and later ones pay a ``stat`` per file.

Configure with ``SearchAgent(corpus=..., data_dir=...)`` or the environment:
``CHORUS_CORPUS`` (folders separated by ``os.pathsep``; the word ``builtin`` adds the
built-in corpus; unset: the built-in corpus) and ``CHORUS_DATA_DIR`` (default ``./data``).
A ``corpus`` value on ``sys.config`` switches the corpus at run time. The task text is
the query; ``params["k"]`` asks for that many hits (default 5).
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from runtime.errors import ConfigError

from .base import Agent, Task, TaskFailed, TaskResult
from .corpus import CHUNKER_VERSION, Chunk, Corpus, fill, index_dir, read_prompt

SCHEMA_VERSION = f"1/{CHUNKER_VERSION}"
# a title match says more about a passage than a body match (bm25 column weights)
TITLE_WEIGHT = 3.0
BODY_WEIGHT = 1.0
SNIPPET_TOKENS = 40
# words too common to say anything about what a question is after
STOPWORDS = frozenset(
    """a about an and are as at be been but by can could did do does doing for from had has
    have how i if in into is it its me my of on or should so than that the their them then
    there these they this those to was we were what when where which who whom why will with
    would you your""".split()
)


@dataclass(frozen=True)
class Hit:
    """One ranked passage: where it is from, a snippet, and its score (higher is better)."""

    id: int  # the passage's row in the index; stable while its file is unchanged
    source: str
    title: str
    snippet: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        """The form a task result carries."""
        return {
            "source": self.source,
            "title": self.title,
            "snippet": self.snippet,
            "score": round(self.score, 4),
        }


@dataclass
class IndexReport:
    """What one :meth:`SearchIndex.update` did."""

    added: int = 0  # files new to the index
    updated: int = 0  # files whose content changed
    removed: int = 0  # files gone from the corpus
    unchanged: int = 0
    chunks: int = 0  # passages in the index afterwards
    seconds: float = 0.0
    changed_files: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether any passage was added or removed."""
        return bool(self.added or self.updated or self.removed)


def match_expression(query: str) -> str:
    """An FTS5 query for free text: its distinct non-stopwords, quoted, joined by OR
    (quoting keeps punctuation and FTS5 operators in questions harmless)."""
    words = [w for w in re.findall(r"\w+", query.lower()) if w not in STOPWORDS]
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


class SearchIndex:
    """The BM25 index of a corpus in one SQLite file. Methods block: call them in a
    thread. Each call opens its own connection, so any thread may call any method."""

    def __init__(self, path: Path, corpus: Corpus) -> None:
        self.path = path
        self.corpus = corpus
        self._update_lock = threading.Lock()

    @classmethod
    def open(
        cls, corpus: Corpus | None = None, data_dir: str | os.PathLike[str] | None = None
    ) -> SearchIndex:
        """The index of ``corpus`` (default: the configured one) under the data dir."""
        return cls(index_dir(data_dir) / "search.sqlite", corpus or Corpus.configured())

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: transactions are explicit; another process may hold the write
        # lock for a whole build, hence the long busy timeout
        db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
        finally:
            db.close()

    def _ensure_schema(self, db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT)")
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is not None and row[0] == SCHEMA_VERSION:
            return
        db.execute("DROP TABLE IF EXISTS files")
        db.execute("DROP TABLE IF EXISTS chunks")
        db.execute(
            "CREATE TABLE files(origin TEXT PRIMARY KEY, path TEXT, mtime_ns INTEGER,"
            " size INTEGER, sha256 TEXT)"
        )
        db.execute(
            "CREATE VIRTUAL TABLE chunks USING fts5(origin UNINDEXED, source UNINDEXED,"
            " digest UNINDEXED, title, body, tokenize=\"porter unicode61 tokenchars '_'\")"
        )
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))

    def update(self) -> IndexReport:
        """Bring the index in line with the corpus files; returns what changed."""
        started = time.perf_counter()
        report = IndexReport()
        origins = self.corpus.origins()
        with self._update_lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes too
            try:
                self._ensure_schema(db)
                known = {
                    row[0]: row[1:]
                    for row in db.execute("SELECT origin, path, mtime_ns, size, sha256 FROM files")
                }
                for origin in origins:
                    try:
                        stat = origin.path.stat()
                    except FileNotFoundError:
                        continue  # vanished since the listing; dropped below
                    stamp = (str(origin.path), stat.st_mtime_ns, stat.st_size)
                    previous = known.pop(origin.key, None)
                    if previous is not None and tuple(previous[:3]) == stamp:
                        report.unchanged += 1
                        continue
                    data = origin.path.read_bytes()
                    digest = hashlib.sha256(data).hexdigest()
                    db.execute(
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                        (origin.key, *stamp, digest),
                    )
                    if previous is not None and previous[3] == digest:
                        report.unchanged += 1  # touched, not changed
                        continue
                    db.execute("DELETE FROM chunks WHERE origin = ?", (origin.key,))
                    db.executemany(
                        "INSERT INTO chunks(origin, source, digest, title, body)"
                        " VALUES (?, ?, ?, ?, ?)",
                        [
                            (origin.key, c.source, c.digest, c.title, c.text)
                            for c in origin.chunks(data)
                        ],
                    )
                    if previous is None:
                        report.added += 1
                    else:
                        report.updated += 1
                    report.changed_files.append(origin.label)
                for gone in known:
                    db.execute("DELETE FROM chunks WHERE origin = ?", (gone,))
                    db.execute("DELETE FROM files WHERE origin = ?", (gone,))
                    report.removed += 1
                    report.changed_files.append(gone)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            report.chunks = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        report.seconds = time.perf_counter() - started
        return report

    def search(self, query: str, k: int = 5, *, per_source: int | None = 1) -> list[Hit]:
        """The ``k`` best passages for ``query`` by BM25, at most ``per_source`` from one
        source (None: no limit), best first."""
        expression = match_expression(query)
        if not expression or k <= 0:
            return []
        hits: list[Hit] = []
        taken: dict[str, int] = {}
        with self._connect() as db:
            if not _has_index(db):
                return []
            rows = db.execute(
                "SELECT rowid, source, title,"
                f" snippet(chunks, 4, '', '', ' … ', {SNIPPET_TOKENS}),"
                f" bm25(chunks, 0, 0, 0, {TITLE_WEIGHT}, {BODY_WEIGHT}) AS rank"
                " FROM chunks WHERE chunks MATCH ? ORDER BY rank",
                (expression,),
            )
            for rowid, source, title, snippet, rank in rows:
                if per_source is not None and taken.get(source, 0) >= per_source:
                    continue
                taken[source] = taken.get(source, 0) + 1
                hits.append(Hit(rowid, source, title, snippet.strip(), -rank))
                if len(hits) >= k:
                    break
        return hits

    def rank(self, query: str, limit: int = 50) -> list[int]:
        """Passage ids by BM25 for ``query``, best first (for rank fusion)."""
        return [hit.id for hit in self.search(query, limit, per_source=None)]

    def passages(self, ids: Sequence[int]) -> dict[int, Chunk]:
        """The passages with these ids (ids not in the index are left out)."""
        found: dict[int, Chunk] = {}
        with self._connect() as db:
            if not _has_index(db):
                return found
            for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                part = list(ids[start : start + 500])
                marks = ",".join("?" * len(part))
                for row in db.execute(
                    f"SELECT rowid, source, title, body FROM chunks WHERE rowid IN ({marks})", part
                ):
                    found[row[0]] = Chunk(row[1], row[2], row[3])
        return found

    def chunks(self) -> dict[int, tuple[Chunk, str]]:
        """Every passage by id, with its content digest."""
        with self._connect() as db:
            if not _has_index(db):
                return {}
            rows = db.execute("SELECT rowid, source, title, body, digest FROM chunks")
            return {row[0]: (Chunk(row[1], row[2], row[3]), row[4]) for row in rows}


def _has_index(db: sqlite3.Connection) -> bool:
    """Whether the file holds an index yet (``update`` creates it)."""
    row = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks'").fetchone()
    return row is not None


def summarize(query: str, hits: list[Hit]) -> str:
    """The one-line message of a search result (template: ``prompts/search.md``)."""
    templates = read_prompt("search")
    if not hits:
        return fill(templates["no hits"], {"query": query})
    listed = "; ".join(f"{h.title} ({h.source})" for h in hits[:3])
    return fill(templates["summary"], {"query": query, "count": len(hits), "hits": listed})


class SearchAgent(Agent):
    """Answers a query with ranked passages from the corpus (see the module docstring)."""

    name = "search"

    def __init__(
        self,
        corpus: Corpus | str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        k: int = 5,
    ) -> None:
        super().__init__()
        self.corpus = Corpus.configured(corpus)
        self.index = SearchIndex.open(self.corpus, data_dir)
        self.k = k

    async def on_config(self, key: str, value: str) -> None:
        """``corpus``: index and search another corpus from the next task on."""
        if key == "corpus":
            try:
                self.corpus = Corpus.configured(value)
            except ConfigError as exc:  # keep the corpus it has; a bad setting is not a crash
                await self.fault("config", str(exc))
                return
            self.index = SearchIndex(self.index.path, self.corpus)

    async def on_task(self, task: Task) -> TaskResult:
        """Search for the task text; hits in ``data["hits"]``, their sources in order."""
        query = task.text.strip()
        if not query:
            raise TaskFailed("empty query: put the words to search for in the task text")
        try:
            k = int(task.params.get("k", self.k))
        except ValueError:
            raise TaskFailed(f"params.k must be a whole number, not {task.params['k']!r}") from None
        index = self.index
        report = await anyio.to_thread.run_sync(index.update)
        if report.changed:
            await self.progress(
                task, f"indexed {report.chunks} passages in {report.seconds:.1f} s", 0.5
            )
        hits = await anyio.to_thread.run_sync(lambda: index.search(query, k))
        return TaskResult(
            message=summarize(query, hits),
            data={"query": query, "hits": [h.as_dict() for h in hits]},
            sources=[h.source for h in hits],
        )
