"""`rag index build`: BM25 or dense indexes (more kinds register in INDEX_BUILDERS)."""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.config import build_config, load_config_file
from core.errors import RagError
from core.runinfo import RunRecord

logger = logging.getLogger(__name__)


def _build_bm25(args: argparse.Namespace, file_cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from retrievers.bm25 import BM25Config, build_bm25_index
    config = build_config(BM25Config, file_cfg, {"backend": args.backend, "words_per_passage": args.words_per_passage,
                                                 "stride": args.stride})
    if getattr(args, "ray", False):
        logger.info("BM25 indexing is single-process: --ray and its worker flags are ignored, building locally")
    return config, build_bm25_index(args.corpus, args.out, config, overwrite=args.overwrite)


def _build_dense(args: argparse.Namespace, file_cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from retrievers.dense_build import DenseBuildConfig, build_dense_index
    config = build_config(DenseBuildConfig, file_cfg, {
        "encoder": args.encoder, "faiss": args.faiss, "batch_size": args.batch_size, "shard_size": args.shard_size,
        "words_per_passage": args.words_per_passage, "stride": args.stride, "device": args.device,
        "keep_embeddings": args.keep_embeddings or None, "passage_precision": args.passage_precision,
        "token_sort": args.token_sort or None, "nprobe": args.nprobe, "ef_search": args.ef_search})
    encode_shards = None
    address, workers, gpus = (getattr(args, k, None) for k in ("address", "workers", "gpus_per_worker"))
    if getattr(args, "ray", False):
        from retrievers.ray_build import ray_encode_shards
        encode_shards = ray_encode_shards(workers=2 if workers is None else workers, gpus_per_worker=gpus or 0,
                                          address=address, batch_size=config.batch_size)
    elif address or workers is not None or gpus:
        raise RagError("--address, --workers and --gpus-per-worker need --ray")
    return config, build_dense_index(args.corpus, args.out, config, overwrite=args.overwrite,
                                     encode_shards=encode_shards)


def _build_trie(args: argparse.Namespace, file_cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from retrievers.generative.index import build_trie_from_cli  # the generative retriever owns its index
    return build_trie_from_cli(args, file_cfg)


INDEX_BUILDERS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], tuple[Any, dict[str, Any]]]] = {
    "bm25": _build_bm25,
    "dense": _build_dense,
    "trie": _build_trie,
}


def register(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="build indexes").add_subparsers(dest="index_cmd", required=True)
    build = index.add_parser("build", help="build a BM25 or dense index over a corpus")
    build.add_argument("--corpus", required=True, type=Path, help="corpus JSONL or a folder holding corpus.jsonl")
    build.add_argument("--out", required=True, type=Path)
    build.add_argument("--kind", required=True, help=f"one of: {', '.join(INDEX_BUILDERS)}")
    build.add_argument("--backend", help="BM25 backend: bm25s (default) | pyserini")
    build.add_argument("--model", help="trie: the seq2seq model or generative run folder whose tokenizer it uses")
    build.add_argument("--encoder", help="dense encoder: alias, folder, hub id or run folder (default: minilm)")
    build.add_argument("--faiss", help="Faiss index-factory string (default Flat; e.g. HNSW32, IVF1024,PQ48)")
    build.add_argument("--batch-size", type=int)
    build.add_argument("--shard-size", type=int, help="passages per embedding shard (unit of resume)")
    build.add_argument("--words-per-passage", type=int)
    build.add_argument("--stride", type=int)
    build.add_argument("--device", help="torch device for encoding (default: auto)")
    build.add_argument("--keep-embeddings", action="store_true")
    build.add_argument("--passage-precision", choices=["float32", "bfloat16"],
                       help="dense: encode passages in bfloat16 (queries stay float32); with --token-sort about "
                            "2.3x faster on CPU at the same dev Rprec (bench/bench_encoding.py)")
    build.add_argument("--nprobe", type=int, help="dense IVF: lists searched by default (default 16)")
    build.add_argument("--ef-search", type=int, help="dense HNSW: search depth by default (default 128)")
    build.add_argument("--token-sort", action="store_true",
                       help="dense: batch passages by token count (less padding)")
    build.add_argument("--config", type=Path, help="JSON/YAML config; flags override it")
    build.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    build.add_argument("--ray", action="store_true",
                       help="dense: encode shards on a Ray actor pool (local Ray unless --address); bm25: ignored")
    build.add_argument("--address", help="with --ray: join this Ray cluster (host:6379 or auto); "
                       "the output folder must be on storage every node sees")
    build.add_argument("--workers", type=int, help="with --ray: encoder actors (default 2)")
    build.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="with --ray: GPUs per actor (fractions share a GPU; > 0 encodes on cuda)")
    build.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    builder = INDEX_BUILDERS.get(args.kind)
    if builder is None:
        raise RagError(f"unknown index kind {args.kind!r}; choose one of {', '.join(INDEX_BUILDERS)}")
    file_cfg = load_config_file(args.config) if args.config else {}
    record = RunRecord(f"index build --kind {args.kind}", None)
    with record.timed("build_s"):
        config, manifest = builder(args, file_cfg)
    record.config = {"kind": args.kind, "corpus": str(args.corpus), **vars(config)} if hasattr(config, "__dict__") else {}
    record.write(Path(args.out) / "run.json")
    print(json.dumps({"out": str(args.out), "kind": manifest["kind"], "counts": manifest.get("counts"),
                      "seconds": record.timings["build_s"]}, indent=2))
    return 0
