"""`rag eval compare GOLD BASE OTHER`: a paired comparison of two guess files on the same questions."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rag.flags import positive_int


def add_compare_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("compare", help="paired bootstrap of two KILT guess files on the same gold questions",
                         description="Per-question KILT retrieval metrics of two guess files, the mean difference "
                                     "OTHER - BASE and its 95%% paired-bootstrap interval over the questions.")
    p.add_argument("gold", type=Path, help="KILT gold JSONL")
    p.add_argument("base", type=Path, help="KILT guesses of the baseline")
    p.add_argument("other", type=Path, help="KILT guesses of the system compared with it")
    p.add_argument("--metrics", default="Rprec,recall@5", help="KILT retrieval metrics, comma-separated")
    p.add_argument("--exclude", type=Path, help="KILT/queries file whose ids are left out (e.g. questions used to "
                   "choose settings)")
    p.add_argument("--samples", type=positive_int, default=10_000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from core.errors import RagError
    from core.io import read_jsonl, write_json
    from eval.kilt import per_question
    from eval.stats import paired_bootstrap

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    ks = sorted({int(m.split("@")[1]) for m in metrics if "@" in m} or {5})
    gold = read_jsonl(args.gold)
    if args.exclude is not None:
        drop = {str(r.get("id")).strip() for r in read_jsonl(args.exclude)}
        gold = [r for r in gold if str(r.get("id")).strip() not in drop]
    if not gold:
        raise RagError("no gold questions left to compare")
    base = per_question(args.base, gold, metrics, ks)
    other = per_question(args.other, gold, metrics, ks)
    compared: dict[str, dict[str, object]] = {}
    result = {"gold": str(args.gold), "base": str(args.base), "other": str(args.other), "n": len(gold),
              "excluded": str(args.exclude) if args.exclude else None, "metrics": compared}
    for m in metrics:
        a, b = [base[q][m] for q in base], [other[q][m] for q in base]
        boot = paired_bootstrap(a, b, samples=args.samples, seed=args.seed)
        compared[m] = {"base": sum(a) / len(a), "other": sum(b) / len(b), "diff": boot["diff"],
                                "ci95": [boot["ci_low"], boot["ci_high"]]}
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0
