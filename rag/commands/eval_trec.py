"""`rag eval trec RUN QRELS`: nDCG@k, MRR@k, MAP and recall@k of a TREC run, as trec_eval computes them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_trec_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("trec", help="IR metrics (nDCG, MRR, MAP, recall) of a TREC run against qrels",
                         description="IR metrics of a TREC run (qid Q0 docid rank score tag) against TREC qrels "
                                     "(qid iter docid grade) or BEIR qrels TSV. Means are over every judged query; "
                                     "a query missing from the run scores 0 (trec_eval -c). Computed by ir_measures.")
    p.add_argument("run", type=Path, help="TREC run file (e.g. from rag retrieve --trec)")
    p.add_argument("qrels", type=Path, help="TREC qrels or BEIR qrels TSV")
    p.add_argument("--metrics", default="ndcg@10,mrr@10,map,recall@100",
                   help="comma-separated: ndcg@k, mrr@k, map, recall@k, precision@k or ir_measures names")
    p.add_argument("--ties", choices=["check", "score", "rank"], default="check",
                   help="tied scores: refuse a run whose rank column disagrees with trec_eval's order (check), "
                        "accept trec_eval's order (score), or score by the rank column (rank)")
    p.add_argument("--topics", type=Path, help="topics file (TREC tsv or BEIR queries.jsonl): every judged query "
                   "must be one of its queries")
    p.add_argument("--per-query", action="store_true", help="also print each query's values (JSON)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_trec)


def run_trec(args: argparse.Namespace) -> int:
    from eval.ir_metrics import evaluate_run_files

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    topics = None
    if args.topics is not None:
        from core.topics import load_topics
        topics = dict(load_topics(args.topics))
    result = evaluate_run_files(args.run, args.qrels, metrics, ties=args.ties, topics=topics)
    if not args.per_query:
        result.pop("per_query")
    if args.json or args.per_query:
        print(json.dumps(result, indent=2))
        return 0
    rows = [("n", str(result["n"])), ("queries_in_run", str(result["queries_in_run"]))]
    rows += [(m, f"{result[m]:.4f}") for m in metrics]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows))
    return 0
