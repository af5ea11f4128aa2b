"""`rag retrieve`: KILT guesses (and optionally a TREC run) from any index folder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from core.runinfo import RunRecord, record_path_for
from retrievers.base import retrieve_queries


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieve", help="retrieve documents for KILT queries")
    p.add_argument("--index", required=True, type=Path, help="index folder from rag index build (any kind)")
    p.add_argument("--queries", required=True, type=Path, help="KILT JSONL (id, input)")
    p.add_argument("--k", type=int, default=100, help="documents per query")
    p.add_argument("--out", required=True, type=Path, help="KILT guesses JSONL")
    p.add_argument("--trec", type=Path, help="also write a TREC run file")
    p.add_argument("--encoder", help="dense: override the encoder (checked against the manifest)")
    p.add_argument("--batch-size", type=int, default=64, help="queries per search batch")
    p.add_argument("--nprobe", type=int, help="IVF indexes: lists to visit")
    p.add_argument("--ef-search", type=int, help="HNSW indexes: search breadth")
    p.add_argument("--k-factor", type=int, help="...,RFlat indexes: exactly re-rank k * k_factor candidates")
    p.add_argument("--gpu", action="store_true", help="search on a GPU when faiss-gpu is installed")
    p.add_argument("--model", help="generative: the seq2seq model or run folder that generates titles")
    p.add_argument("--beams", type=int, default=10, help="generative: beams (every beam is a ranked candidate)")
    p.set_defaults(func=run_retrieve)


def run_retrieve(args: argparse.Namespace) -> int:
    from core.tasks import load_queries, write_guesses
    from eval.trec import write_trec
    from retrievers import open_retriever

    record = RunRecord("retrieve", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                    if k != "func"})
    queries = load_queries(args.queries)
    with record.timed("load_s"):
        retriever = open_retriever(args.index, encoder=args.encoder, nprobe=args.nprobe, ef_search=args.ef_search,
                                   k_factor=args.k_factor, gpu=args.gpu, model=args.model, beams=args.beams)
    start = time.perf_counter()
    with record.timed("retrieve_s"):
        rankings = retrieve_queries(retriever, [q.text for q in queries], args.k, args.batch_size,
                                    [q.domain for q in queries])
    record.extra["queries_per_second"] = round(len(queries) / max(time.perf_counter() - start, 1e-9), 2)
    write_guesses(args.out, queries, rankings)
    if args.trec:
        write_trec(args.trec, [q.id for q in queries], rankings, tag=Path(args.index).name)
    record.write(record_path_for(args.out))
    print(f"wrote {len(queries)} guesses to {args.out} ({record.extra['queries_per_second']} queries/s)")
    return 0
