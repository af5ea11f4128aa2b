"""IR metrics over TREC runs and qrels (nDCG@k, MRR@k, MAP, recall@k), as trec_eval computes them.

The numbers come from ir_measures (pytrec_eval underneath); this module reads the files strictly, so a
malformed run or qrels file is a one-line error naming file and line instead of a silently wrong score.
Means are over every query in the qrels: a query the run does not answer scores 0 (trec_eval -c).

Formats read: TREC qrels (`qid iter docid grade`, whitespace-separated), BEIR qrels TSV (`query-id
corpus-id score`, with a header), TREC runs (`qid Q0 docid rank score tag`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core.errors import InputError, RagError

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "map", "recall@100")
# Our names (as BEIR prints them) -> ir_measures names.
_ALIASES = {"ndcg": "nDCG", "mrr": "RR", "map": "AP", "recall": "R", "precision": "P", "r-precision": "Rprec",
            "rprec": "Rprec", "success": "Success"}


def _lines(path: str | Path) -> Iterable[tuple[int, list[str]]]:
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "not a file", path)
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                parts = line.split()
                if parts:
                    yield lineno, parts
    except UnicodeDecodeError as exc:
        raise InputError(f"invalid UTF-8 at byte {exc.start}", path) from None


def read_qrels(path: str | Path) -> Qrels:
    """TREC qrels (4 columns) or BEIR qrels TSV (3 columns with a `query-id` header); grades are integers."""
    qrels: Qrels = {}
    for lineno, parts in _lines(path):
        if lineno == 1 and parts[0].lower() in ("query-id", "query_id", "qid"):
            continue  # BEIR header
        if len(parts) == 4:
            qid, _, docid, grade = parts
        elif len(parts) == 3:
            qid, docid, grade = parts
        else:
            raise InputError(f"expected 4 columns (qid iter docid grade) or 3 (BEIR), got {len(parts)}", path, lineno)
        try:
            value = int(grade)
        except ValueError:
            raise InputError(f"relevance grade must be an integer, got {grade!r}", path, lineno, "grade") from None
        docs = qrels.setdefault(qid, {})
        if docid in docs and docs[docid] != value:
            raise InputError(f"document {docid!r} of query {qid!r} is judged twice ({docs[docid]} and {value})",
                             path, lineno)
        docs[docid] = value
    if not qrels:
        raise InputError("no judgements", path)
    return qrels


def read_run(path: str | Path, ties: str = "check") -> Run:
    """A TREC run, strictly: 6 columns, a numeric rank and a finite score, no document twice in a query.

    Tied scores: trec_eval orders them by document id (descending), not by the rank column. `ties="check"`
    refuses a run whose rank column orders a tie differently (its score would not be the one its ranks
    say); `"score"` accepts trec_eval's order; `"rank"` follows the rank column. The returned scores encode
    the settled order (n, n-1, ..., 1 per query), so every metric backend ranks the same way.
    """
    if ties not in ("check", "score", "rank"):
        raise RagError(f"ties must be check, score or rank, not {ties!r}")
    rows: dict[str, list[tuple[int, float, str, int]]] = {}
    for lineno, parts in _lines(path):
        if len(parts) != 6:
            raise InputError(f"expected 6 columns (qid Q0 docid rank score tag), got {len(parts)}", path, lineno)
        qid, _, docid, rank_text, score_text, _ = parts
        try:
            rank, score = int(rank_text), float(score_text)
        except ValueError:
            raise InputError(f"rank must be an integer and score a number, got {rank_text!r} {score_text!r}",
                             path, lineno) from None
        if not math.isfinite(score):
            raise InputError(f"score is not finite: {score_text}", path, lineno, "score")
        rows.setdefault(qid, []).append((rank, score, docid, lineno))
    if not rows:
        raise InputError("the run is empty", path)
    run: Run = {}
    for qid, hits in rows.items():
        seen: dict[str, int] = {}
        for _, _, docid, lineno in hits:
            if docid in seen:
                raise InputError(f"document {docid!r} appears twice for query {qid!r} (first at line {seen[docid]})",
                                 path, lineno)
            seen[docid] = lineno
        by_rank = [docid for _, _, docid, _ in sorted(hits)]
        by_trec = [docid for _, _, docid, _ in sorted(hits, key=lambda h: (-h[1], _desc(h[2])))]
        if ties == "check" and by_rank != by_trec:
            first = next(i for i, (a, b) in enumerate(zip(by_rank, by_trec)) if a != b)
            raise InputError(f"query {qid!r}: the rank column and the scores disagree at rank {first + 1} "
                             f"({by_rank[first]!r} vs {by_trec[first]!r}; tied or unsorted scores: trec_eval "
                             "ranks by score, ties by document id, descending); use --ties score or --ties rank",
                             path)
        # The order is settled here, so the metric backend's own tie-breaking never matters.
        order = by_rank if ties == "rank" else by_trec
        run[qid] = {docid: float(len(order) - i) for i, docid in enumerate(order)}
    return run


class _desc(str):
    """Sort key that orders strings descending (trec_eval's tie-break on document ids)."""

    def __lt__(self, other: str) -> bool:  # type: ignore[override]
        return str.__gt__(self, other)


def parse_metric(name: str) -> Any:
    """`ndcg@10`, `mrr@10`, `map`, `recall@100`, or any ir_measures name (`nDCG@20`, `P@5`, `Judged@10`)."""
    import ir_measures

    base, _, cut = name.partition("@")
    measure = _ALIASES.get(base.lower(), base) + (f"@{cut}" if cut else "")
    try:
        return ir_measures.parse_measure(measure)
    except (ValueError, NameError, KeyError, AttributeError):
        raise RagError(f"unknown metric {name!r}; e.g. {', '.join(DEFAULT_METRICS)} or an ir_measures name") from None


def evaluate_run(run: Run, qrels: Qrels, metrics: Iterable[str] = DEFAULT_METRICS,
                 topics: Iterable[str] | None = None, qrels_path: str | Path | None = None) -> dict[str, Any]:
    """Mean of each metric over the queries of the qrels, plus `n` and per-query values."""
    import ir_measures

    if topics is not None:
        known = set(topics)
        unknown = sorted(set(qrels) - known)
        if unknown:
            raise InputError(f"{len(unknown)} judged queries are not in the topics (e.g. {unknown[0]!r})", qrels_path)
    names = list(metrics)
    measures = {name: parse_metric(name) for name in names}
    qrels_rows = [ir_measures.Qrel(q, d, g) for q, docs in qrels.items() for d, g in docs.items()]
    run_rows = [ir_measures.ScoredDoc(q, d, s) for q, docs in run.items() for d, s in docs.items()]
    per_query: dict[str, dict[str, float]] = {q: {name: 0.0 for name in names} for q in qrels}
    by_measure = {str(m): name for name, m in measures.items()}
    for metric in ir_measures.iter_calc(list(measures.values()), qrels_rows, run_rows):
        if metric.query_id in per_query:
            per_query[metric.query_id][by_measure[str(metric.measure)]] = float(metric.value)
    n = len(per_query)
    means = {name: sum(values[name] for values in per_query.values()) / n for name in names}
    return {"n": n, "queries_in_run": len(set(run) & set(qrels)), **means, "per_query": per_query}


def evaluate_run_files(run_path: str | Path, qrels_path: str | Path, metrics: Iterable[str] = DEFAULT_METRICS,
                       ties: str = "check", topics: Mapping[str, str] | None = None) -> dict[str, Any]:
    qrels = read_qrels(qrels_path)
    run = read_run(run_path, ties=ties)
    return evaluate_run(run, qrels, metrics, topics=topics, qrels_path=qrels_path)
