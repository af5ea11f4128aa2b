"""`rag retrieve`: KILT guesses (and optionally a TREC run) from any index folder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from core.runinfo import RunRecord, record_path_for
from rag.flags import positive_int
from retrievers.base import retrieve_queries


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieve", help="retrieve documents for KILT queries")
    p.add_argument("--index", required=True, type=Path, help="index folder from rag index build (any kind)")
    p.add_argument("--queries", required=True, type=Path, help="KILT JSONL (id, input)")
    p.add_argument("--k", type=positive_int, default=100, help="documents per query")
    p.add_argument("--out", required=True, type=Path, help="KILT guesses JSONL (never one of the inputs)")
    p.add_argument("--trec", type=Path, help="also write a TREC run file (default: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing --out / --trec files (default: off: an existing file is refused)")
    p.add_argument("--encoder", help="dense: override the encoder (checked against the manifest)")
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=None,
                   help="dense: memory-map the Faiss index file instead of reading it (same results, RAM not "
                        "held; default: on for every index type but fast-scan ...x4fs, off with --gpu)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="queries per search batch")
    p.add_argument("--nprobe", type=positive_int, help="IVF indexes: lists to visit")
    p.add_argument("--ef-search", type=positive_int, help="HNSW indexes: search breadth")
    p.add_argument("--k-factor", type=positive_int, help="...,RFlat indexes: exactly re-rank k * k_factor candidates")
    p.add_argument("--threads", type=positive_int,
                   help="bm25 and Lucene indexes: queries of a batch searched at once (default: the CPU count)")
    p.add_argument("--docid-suffix", default="",
                   help="an existing Lucene index folder: regular expression removed from the end of each docid to "
                        "give the document id, e.g. '-\\d+' (default: '', docids as they are)")
    add_gpu_flags(p)
    p.add_argument("--model", help="generative: the seq2seq model or run folder that generates titles")
    p.add_argument("--beams", type=positive_int, default=10, help="generative: beams (every beam is a ranked candidate)")
    p.set_defaults(func=run_retrieve)


def add_gpu_flags(p: argparse.ArgumentParser) -> None:
    """--gpu, --gpu-shard, --gpu-fp16: shared by `rag retrieve` and `rag answer`."""
    p.add_argument("--gpu", action="store_true",
                   help="dense: search the Faiss index on every visible GPU (needs the gpu extra, faiss-gpu-cu12; "
                        "CUDA_VISIBLE_DEVICES picks the GPUs; HNSW, ...,RFlat and ...x4fs indexes have no GPU version)")
    p.add_argument("--gpu-shard", action="store_true",
                   help="with --gpu: split the index over the GPUs (each holds 1/n) instead of a full copy on each")
    p.add_argument("--gpu-fp16", action="store_true",
                   help="with --gpu: Flat vectors and IVF-PQ lookup tables in float16 (less GPU memory, scores "
                        "change slightly)")


def gpu_options(args: argparse.Namespace) -> dict[str, bool]:
    """The --gpu flags as retriever options, refused before anything loads where they cannot apply."""
    from core.errors import RagError
    from index.manifest import read_manifest

    if (args.gpu_shard or args.gpu_fp16) and not args.gpu:
        raise RagError("--gpu-shard and --gpu-fp16 need --gpu")
    if not args.gpu:
        return {}
    kind = read_manifest(args.index).get("kind")
    if kind != "dense":
        raise RagError(f"--gpu: {args.index} is a {kind} index; only dense (Faiss) indexes search on a GPU")
    return {"gpu": True, "gpu_shard": args.gpu_shard, "gpu_fp16": args.gpu_fp16}


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that are inputs (or inside --index) or that exist without --overwrite."""
    from core.errors import RagError
    from core.io import check_output_file

    inputs = {"--queries": args.queries, "--index": args.index}
    if getattr(args, "model", None) and Path(args.model).exists():
        inputs["--model"] = args.model
    check_output_file(args.out, args.overwrite, inputs=inputs)
    check_output_file(record_path_for(args.out), True, inputs=inputs, flag="the record of --out")
    if getattr(args, "trec", None) is not None:
        if Path(args.trec).resolve() == Path(args.out).resolve():
            raise RagError(f"--trec {args.trec} is the --out file; give them different paths")
        check_output_file(args.trec, args.overwrite, inputs=inputs, flag="--trec")


def run_retrieve(args: argparse.Namespace) -> int:
    from core.io import output_lock

    with output_lock(args.out):  # a second run writing the same --out fails at once
        check_outputs(args)
        return _retrieve(args)


def _retrieve(args: argparse.Namespace) -> int:
    from core.tasks import load_queries, write_guesses
    from eval.trec import write_trec
    from retrievers import open_retriever

    record = RunRecord("retrieve", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                    if k != "func"})
    gpu = gpu_options(args)
    queries = load_queries(args.queries)
    with record.timed("load_s"):
        retriever = open_retriever(args.index, encoder=args.encoder, nprobe=args.nprobe, ef_search=args.ef_search,
                                   k_factor=args.k_factor, model=args.model, beams=args.beams,
                                   threads=args.threads, docid_suffix=args.docid_suffix, mmap=args.mmap, **gpu)
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
