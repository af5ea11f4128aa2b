"""`rag demo [--out DIR]`: prepare data, build BM25 and dense indexes, retrieve, evaluate, report."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole chain on the embedded data")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--encoder", help="dense encoder (default: packaged MiniLM)")
    p.add_argument("--faiss", default="Flat")
    p.add_argument("--limit", type=int, help="only the first N dev questions")
    p.add_argument("--retrievers", default="bm25,dense", help="comma-separated: bm25,dense")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rag.demo import DemoConfig, run_demo
    run_demo(DemoConfig(out=args.out, encoder=args.encoder, faiss=args.faiss, limit=args.limit,
                        retrievers=tuple(r.strip() for r in args.retrievers.split(",") if r.strip())))
    return 0
