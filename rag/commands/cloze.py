"""`rag data cloze`: cloze questions (a salient span of a corpus sentence blanked) as KILT JSONL."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, type=Path, help="corpus folder or JSONL")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--out", required=True, type=Path, help="KILT JSONL to write")
    parser.add_argument("--seed", type=int, default=0, help="seeds which sentence and span of a document are used")
    parser.add_argument("--per-doc", type=int, default=1, help="questions per document at most")
    parser.add_argument("--max-questions", type=int, default=0, help="stop after N questions (0 = all)")
    parser.add_argument("--types", default="year,number,name", help="span types to mask")
    parser.add_argument("--domains", help="comma-separated: keep documents of these domains only (topic splits)")


def run(args: argparse.Namespace) -> int:
    from core.io import check_output_file

    check_output_file(args.out, args.overwrite, inputs={"--corpus": args.corpus})
    from core.corpus import resolve_corpus_path
    from core.io import iter_jsonl, write_json, write_jsonl
    from readers.cloze import cloze_questions

    domains = {d.strip() for d in args.domains.split(",")} if args.domains else None
    docs = (row for _, row in iter_jsonl(resolve_corpus_path(args.corpus)))
    rows, stats = cloze_questions(docs, args.seed, args.per_doc, args.max_questions,
                                  tuple(t.strip() for t in args.types.split(",") if t.strip()), domains)
    write_jsonl(args.out, rows)
    write_json(Path(str(args.out) + ".stats.json"), stats)
    print(json.dumps(stats, indent=2))
    return 0
