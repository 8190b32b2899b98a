"""Recall@5 of the RAG agent's three retrieval methods on labelled questions, and what
building and querying the indexes costs.

Builds, from scratch in a temporary data dir, the search agent's BM25 index
(SQLite FTS5) and the RAG agent's vectors (all-MiniLM-L6-v2) over the built-in corpus
(``pydoc_data.topics`` + the project's docs), then asks each of :data:`QUESTIONS` —
written by reading the pydoc topics, each labelled with every topic whose text answers
it (the data-model and compound-statement topics repeat others, so many questions have
two or three labels) — of three retrievers:

- bm25: the search agent's index;
- dense: cosine similarity of MiniLM vectors;
- hybrid: reciprocal rank fusion of the two (k = 60), what the RAG agent uses.

A question counts as recalled at 5 when one of its labelled sources is among the first
five distinct sources of the ranking. Also reported: recall@1, MRR (over the first ten
sources), the build times (first build, and a restart that finds every vector in the
cache) and per-query latency (median and p95 over all questions).

Run: ``.venv/bin/python benchmarks/retrieval.py`` — writes
``benchmarks/results/retrieval.json`` and ``.png``. ``--quick`` writes under
``benchmarks/results/quick/`` and keeps its vectors in ``$CHORUS_CACHE_DIR`` (default
``~/.cache/chorus``)/retrieval, so only its first run embeds the corpus. Wall time on 2
cores: the full run 232 s measured at a load average of 7.6 (embedding the 838 passages
took 205 s of it, about 95 s of CPU time, so roughly 1–2 min on idle cores); ``--quick``
with a warm cache 15–40 s (loading the model twice is most of it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agents.corpus import Corpus  # noqa: E402
from agents.rag import DEFAULT_METHOD, METHODS, Method, Retriever  # noqa: E402
from benchmarks._common import percentile, save_plot, write_json  # noqa: E402

K = 5

# (question, the pydoc topics whose text answers it). Phrased as a user would ask,
# not copied from the topic; labels checked against the text of Python 3.11's topics.
QUESTIONS: list[tuple[str, list[str]]] = [
    ("When does the else block after a for loop run?", ["for", "compound", "break"]),
    ("What does the pass statement do?", ["pass"]),
    (
        "How do I right-align a number in a field ten characters wide with format()?",
        ["formatstrings"],
    ),
    ("What is the difference between __str__ and __repr__?", ["customization", "specialnames"]),
    (
        "Which methods must an object have to be used in a with statement?",
        ["context-managers", "with", "compound", "specialnames"],
    ),
    (
        "How can a nested function assign to a variable of the enclosing function?",
        ["nonlocal", "naming"],
    ),
    ("Which built-in values count as false in an if condition?", ["truth", "booleans"]),
    ("Is x < y <= z the same as x < y and y <= z?", ["comparisons"]),
    ("Does not bind more tightly than and?", ["operator-summary", "booleans"]),
    (
        "How do I handle two different exception classes with one except clause?",
        ["try", "compound"],
    ),
    ("How do I chain exceptions so the original cause is kept?", ["raise"]),
    (
        "How do I declare parameters that can only be passed by keyword?",
        ["function", "compound"],
    ),
    ("Can a lambda contain statements, or only an expression?", ["lambda"]),
    ("Is x += 1 exactly the same as x = x + 1?", ["augassign", "assignment"]),
    (
        "How do I assign the first item of a list to one variable and the rest to another?",
        ["assignment"],
    ),
    ("How does integer division with // round negative results?", ["binary"]),
    ("What type does 10 ** -2 return for int operands?", ["power"]),
    ("How do I write an integer in hexadecimal or binary notation?", ["integers"]),
    ("How do I write a complex number literal with an imaginary part?", ["imaginary"]),
    ("How are backslashes treated in a raw string literal?", ["strings"]),
    ("How do I remove leading and trailing whitespace from a string?", ["string-methods"]),
    ("How do I break a string into a list of words on a separator?", ["string-methods"]),
    (
        "How do I look up a dictionary key and get a default when it is missing?",
        ["typesmapping"],
    ),
    (
        "What happens if I add keys to a dict while iterating over its items view?",
        ["typesmapping"],
    ),
    ("What does a negative step in a slice like s[::-1] do?", ["typesseq", "slicings"]),
    ("How do I put an item into a list at a given index?", ["typesseq-mutable", "typesseq"]),
    ("How does the in operator work on strings?", ["in"]),
    (
        "Which special method makes len() work on instances of my class?",
        ["sequence-types", "specialnames"],
    ),
    (
        "How do I make the + operator work for objects of my own class?",
        ["numeric-types", "specialnames"],
    ),
    (
        "How can I stop instances from getting a __dict__ to save memory?",
        ["attribute-access", "specialnames"],
    ),
    ("How do I assign to a module-level variable from inside a function?", ["global"]),
    ("What name does import a.b.c bind in the current namespace?", ["import"]),
    ("How do I set a breakpoint on a line in the pdb debugger?", ["debugger"]),
    ("Where am I allowed to use await?", ["await", "async"]),
    ("How do I loop over an asynchronous iterator?", ["async", "compound"]),
    ("What happens to a name after del removes it?", ["del"]),
    ("What is the Ellipsis object and how is it written?", ["bltin-ellipsis-object", "types"]),
    ("Are assert statements still checked when Python runs with -O?", ["assert"]),
    ("Why are class attributes starting with two underscores renamed?", ["atom-identifiers"]),
    (
        "What must hold between __eq__ and __hash__ for objects used as dict keys?",
        ["customization", "specialnames"],
    ),
    ("How do I match a value against several patterns with match and case?", ["compound"]),
    ("What happens when an exception is never handled by any code?", ["exceptions"]),
]


def source_of(topic: str) -> str:
    """The source id the agents give a pydoc topic."""
    return f"pydoc:topics/{topic}"


def score(retriever: Retriever, method: Method) -> dict[str, Any]:
    """Recall@1, recall@5 and MRR@10 of ``method`` over :data:`QUESTIONS`, with latency."""
    firsts = fives = 0
    reciprocal = 0.0
    latencies: list[float] = []
    misses: list[str] = []
    for question, topics in QUESTIONS:
        wanted = {source_of(t) for t in topics}
        started = time.perf_counter()
        ranked = retriever.rank_sources(question, method, n=10)
        latencies.append(time.perf_counter() - started)
        positions = [i for i, source in enumerate(ranked, start=1) if source in wanted]
        first = positions[0] if positions else None
        firsts += first == 1
        fives += first is not None and first <= K
        reciprocal += 1 / first if first else 0.0
        if first is None or first > K:
            misses.append(question)
    n = len(QUESTIONS)
    return {
        "recall_at_1": round(firsts / n, 4),
        "recall_at_5": round(fives / n, 4),
        "mrr_at_10": round(reciprocal / n, 4),
        "query_ms_median": round(statistics.median(latencies) * 1000, 2),
        "query_ms_p95": round(percentile(latencies, 95) * 1000, 2),
        "missed_at_5": misses,
    }


def build(data_dir: Path) -> tuple[Retriever, dict[str, float | int]]:
    """A retriever over the built-in corpus in ``data_dir``, refreshed, and its timings."""
    retriever = Retriever.open(Corpus(), data_dir)
    report = retriever.refresh()
    return retriever, {
        "passages": report.passages,
        "embedded": report.embedded,
        "index_s": round(report.index_seconds, 3),
        "model_load_s": round(report.model_seconds, 2),
        "embed_s": round(report.embed_seconds, 2),
        "total_s": round(report.seconds, 2),
    }


def restart(data_dir: Path) -> dict[str, float | int]:
    """What an agent restart costs: a fresh process that imports, loads the model and
    finds every vector in the cache (``process_s`` is its whole wall time)."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--restart-probe", str(data_dir)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    timings: dict[str, float | int] = json.loads(out.strip().splitlines()[-1])
    return timings | {"process_s": round(time.perf_counter() - started, 2)}


def plot(results: dict[Method, dict[str, Any]], quick: bool) -> Path:
    """Grouped bars: recall@1, recall@5 and MRR@10 per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("recall_at_1", "recall@1"), ("recall_at_5", "recall@5"), ("mrr_at_10", "MRR@10")]
    figure, axes = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics):
        xs = [i + (j - 1) * width for i in range(len(METHODS))]
        values = [results[m][key] for m in METHODS]
        bars = axes.bar(xs, values, width, label=label)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(
        range(len(METHODS)), [f"{m}{' (used)' if m == DEFAULT_METHOD else ''}" for m in METHODS]
    )
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("score")
    axes.set_title(f"Retrieval over pydoc topics + docs, {len(QUESTIONS)} labelled questions")
    axes.legend(loc="lower right")
    return save_plot(figure, "retrieval", quick=quick)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 1 if the method the agent uses is worse than BM25."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument(
        "--quick", action="store_true", help="cached vectors, results under results/quick/"
    )
    parser.add_argument("--restart-probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.restart_probe:
        print(json.dumps(build(args.restart_probe)[1]))
        return 0
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chorus-retrieval-") as tmp:
        if args.quick:
            cache = Path(os.environ.get("CHORUS_CACHE_DIR", Path.home() / ".cache" / "chorus"))
            data_dir = cache / "retrieval"
        else:
            data_dir = Path(tmp)
        retriever, first_build = build(data_dir)
        restarted = restart(data_dir)
        results = {method: score(retriever, method) for method in METHODS}
    recall = {m: results[m]["recall_at_5"] for m in METHODS}
    best = max(METHODS, key=lambda m: (recall[m], results[m]["mrr_at_10"]))
    result: dict[str, Any] = {
        "recall_at_5": recall,
        "used": DEFAULT_METHOD,
        "best": best,
        "used_at_least_bm25": recall[DEFAULT_METHOD] >= recall["bm25"],
        "questions": len(QUESTIONS),
        "k": K,
        "methods": results,
        "build": {"first": first_build, "restart_from_cache": restarted},
        "corpus": "builtin (pydoc_data.topics + README.md + docs/*.md)",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
        },
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    write_json("retrieval", result, quick=args.quick)
    plot(results, args.quick)
    print(f"{'method':<8} {'R@1':>6} {'R@5':>6} {'MRR@10':>7} {'query ms':>9}")
    for m in METHODS:
        r = results[m]
        print(
            f"{m:<8} {r['recall_at_1']:>6.3f} {r['recall_at_5']:>6.3f} {r['mrr_at_10']:>7.3f}"
            f" {r['query_ms_median']:>9.2f}"
        )
    print(
        f"first build {first_build['total_s']} s ({first_build['passages']} passages, "
        f"embedding {first_build['embed_s']} s); restart {restarted['process_s']} s; "
        f"used: {DEFAULT_METHOD}, best: {best}; wall {result['wall_s']} s"
    )
    return 0 if result["used_at_least_bm25"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
