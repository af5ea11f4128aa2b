"""`rag eval kilt GUESS GOLD`: the official KILT metrics."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate").add_subparsers(dest="eval_cmd", required=True)
    kilt = ev.add_parser("kilt", help="KILT retrieval, downstream and KILT-* scores")
    kilt.add_argument("guess", type=Path, help="KILT guesses JSONL (from rag retrieve or rag answer)")
    kilt.add_argument("gold", type=Path, help="KILT gold JSONL (id, input, output with provenance)")
    kilt.add_argument("--ks", type=cutoffs, default="1,5,10,20,100", metavar="K,K,...",
                      help="comma-separated cut-offs, each an integer >= 1")
    kilt.add_argument("--rank-keys", default="wikipedia_id", choices=["wikipedia_id", "title"],
                      help="provenance field that identifies a page")
    kilt.add_argument("--json", action="store_true", help="print JSON (every metric) instead of a table")
    kilt.add_argument("--full", action="store_true",
                      help="table of every metric (context and entity diagnostics included), not only the headline ones")
    kilt.set_defaults(func=run_kilt)
    from rag.commands.eval_compare import add_compare_parser
    from rag.commands.eval_trec import add_trec_parser
    add_trec_parser(ev)
    add_compare_parser(ev)
    swap = ev.add_parser("corpus-swap", help="model x corpus-variant x task matrix on Ray: original vs swapped corpora")
    from rag.swap.cli import add_arguments as add_swap_arguments  # light: stdlib and core.config only
    add_swap_arguments(swap)
    swap.set_defaults(func=run_corpus_swap)


def cutoffs(text: str) -> tuple[int, ...]:
    """argparse type of --ks: comma-separated integers >= 1 ("1,5,10")."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        ks = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,5,10, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"cut-offs must be integers >= 1, got {text!r}")
    return ks


def run_corpus_swap(args: argparse.Namespace) -> int:
    from rag.swap.cli import run
    return run(args)


def run_kilt(args: argparse.Namespace) -> int:
    from eval.kilt import evaluate_kilt, format_kilt_table

    result = evaluate_kilt(args.guess, args.gold, ks=args.ks, rank_keys=(args.rank_keys,))
    print(json.dumps(result, indent=2) if args.json else format_kilt_table(result, full=args.full))
    return 0
