"""`rag rerank --run GUESS --model RUN --out GUESS2`: reorder a first-stage run with a cross-encoder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rag.flags import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rerank", help="re-rank a KILT guess file with a cross-encoder",
                       description="Score each (question, candidate passage) pair of a KILT guess file (from "
                                   "rag retrieve: the candidates carry their passage text) with a cross-encoder "
                                   "and write the candidates reordered, best first.")
    p.add_argument("--run", required=True, type=Path, help="KILT guesses JSONL from rag retrieve (the candidates)")
    p.add_argument("--model", required=True,
                   help="re-ranker run folder from rag train reranker, or any CrossEncoder folder / hub id")
    p.add_argument("--out", required=True, type=Path, help="re-ranked KILT guesses JSONL to write")
    p.add_argument("--k", type=positive_int, help="keep the best k after re-ranking (default: all candidates)")
    p.add_argument("--depth", type=positive_int,
                   help="re-rank only each query's first N candidates; the rest are dropped (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="pairs per scoring batch")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from core.errors import RagError
    from core.io import write_jsonl
    from core.runinfo import RunRecord, record_path_for
    from retrievers.rerank import load_reranker, read_guess_candidates, rerank

    if args.out.resolve() == args.run.resolve():
        raise RagError(f"--out {args.out} is the input run; write the re-ranked run elsewhere")
    if args.out.exists() and not args.overwrite:
        raise RagError(f"{args.out} exists; pass --overwrite to replace it")
    rows, candidates = read_guess_candidates(args.run)
    if args.depth:
        candidates = [c[:args.depth] for c in candidates]
    record = RunRecord("rerank", {"run": str(args.run), "model": str(args.model), "k": args.k, "depth": args.depth})
    with record.timed("load_s"):
        ce = load_reranker(args.model, device=args.device)
    start = time.perf_counter()
    with record.timed("rerank_s"):
        ranked = rerank(ce, [str(r.get("input") or "") for r in rows], candidates, k=args.k, batch_size=args.batch_size)
    pairs = sum(len(c) for c in candidates)
    record.extra["pairs_per_second"] = round(pairs / max(time.perf_counter() - start, 1e-9), 1)
    out_rows = []
    for row, lst in zip(rows, ranked):
        output = dict(row["output"][0])
        output["provenance"] = lst
        out_rows.append({**row, "output": [output, *row["output"][1:]]})
    write_jsonl(args.out, out_rows)
    record.write(record_path_for(args.out))
    print(f"re-ranked {len(rows)} queries ({pairs} pairs, {record.extra['pairs_per_second']} pairs/s) -> {args.out}")
    return 0
