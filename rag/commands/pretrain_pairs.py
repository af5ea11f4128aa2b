"""`rag data pretrain-pairs`: CorpusBrain pre-training pairs (ISS, LPS, HIP) from a corpus, as JSONL."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rag.flags import add_config_flags, flag_values, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from retrievers.generative.pretrain_tasks import PretrainConfig

    parser.add_argument("--corpus", required=True, help="corpus JSONL or a folder holding corpus.jsonl")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--out", required=True, type=Path, help="pairs JSONL (task, source, target, titles, doc_id)")
    parser.add_argument("--limit-docs", type=positive_int, help="only the first N documents (default: all)")
    add_config_flags(parser, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    from core.io import check_output_file

    check_output_file(args.out, args.overwrite, inputs={"--corpus": args.corpus})
    from core.corpus import Corpus
    from retrievers.generative.pretrain_tasks import PretrainConfig, build_pairs, write_pairs

    config = PretrainConfig(**flag_values(PretrainConfig, args))
    corpus = Corpus.load(args.corpus)
    pairs, stats = build_pairs(corpus, config, args.limit_docs)
    n = write_pairs(args.out, pairs)
    print(json.dumps({"out": str(args.out), "written": n, **stats.to_json()}, indent=2))
    return 0
