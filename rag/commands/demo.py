"""`rag demo [--out DIR]`: prepare data, build BM25 and dense indexes, retrieve, evaluate, report."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole chain on the embedded data (about 25 minutes on a 2-core CPU)",
                       description="Prepare vital10k and FanOutQA, build BM25, dense and generative (zero-shot Gemma) "
                                   "indexes, retrieve, evaluate and run the corpus-swap demo. About 25 minutes on a 2-core CPU the first time "
                                   "(most of it encoding vital10k); finished steps are reused on a rerun.")
    p.add_argument("--out", default="runs/demo", help="demo folder (indexes, guesses, report)")
    p.add_argument("--encoder", help="dense encoder (default: packaged MiniLM)")
    p.add_argument("--faiss", default="Flat", help="Faiss index-factory string of the dense index")
    p.add_argument("--limit", type=int, help="only the first N dev questions")
    p.add_argument("--retrievers", default=None,
                   help="comma-separated: bm25,dense,generative (default: all three where the Gemma packages are "
                        "installed, else bm25,dense)")
    p.add_argument("--no-swap", action="store_true", help="skip the corpus-swap section")
    p.add_argument("--swap-config", help="corpus-swap config (default configs/swap-demo.yaml)")
    p.add_argument("--swap-workers", type=int, help="local Ray workers for the swap matrix (0 = no Ray)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rag.demo import DemoConfig, run_demo
    config = DemoConfig(out=args.out, encoder=args.encoder, faiss=args.faiss, limit=args.limit,
                        retrievers=tuple(r.strip() for r in args.retrievers.split(",") if r.strip())
                        if args.retrievers else None,
                        swap_workers=args.swap_workers)
    if args.no_swap:
        config.swap = None
    elif args.swap_config:
        config.swap = args.swap_config
    import logging
    logging.getLogger("rag.demo").info(
        "rag demo: about 25 minutes on a 2-core CPU the first time (encoding 10,033 documents is most of it; "
        "zero-shot Gemma about 5 minutes, the swap section about 6); finished steps in %s are reused", args.out)
    run_demo(config)
    return 0
