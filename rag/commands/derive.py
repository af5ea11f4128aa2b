"""`rag data derive`: a new corpus (and task data) from an existing one through a transform of eval/transforms.py."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import RagError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from eval.transforms import TRANSFORMS

    parser.add_argument("--from", dest="source", required=True, type=Path, help="corpus folder or JSONL")
    parser.add_argument("--transform", required=True, help=f"one of: {', '.join(TRANSFORMS)}")
    parser.add_argument("--qa", type=Path, help="KILT task file (transforms that rewrite answers)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seeds the transform's random choices")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder that rag made (default: off)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="transform option as YAML, e.g. held_out=[Geography,History] sample=2000 n_queries=200")


def run(args: argparse.Namespace) -> int:
    from core.corpus import resolve_corpus_path
    from core.io import atomic_dir, prepare_output_dir, read_jsonl, write_json, write_jsonl
    from core.runinfo import RunRecord
    from eval.transforms import TRANSFORMS

    if args.transform not in TRANSFORMS:
        raise RagError(f"unknown transform {args.transform!r}; choose one of {', '.join(TRANSFORMS)}")
    transform = TRANSFORMS[args.transform]
    if transform.needs_qa and args.qa is None:
        raise RagError(f"transform {args.transform!r} needs --qa QA.jsonl")
    inputs = {"--from": args.source, "--qa": args.qa}
    prepare_output_dir(args.out, args.overwrite, inputs=inputs)  # before any work: never over an input
    if transform.derive is not None:
        import yaml

        from eval.corpus_variants import describe
        try:
            options = {k.replace("-", "_"): yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
        except ValueError:
            raise RagError("--option takes KEY=VALUE") from None
        print(describe(transform.derive(args.source, args.out, tasks=[args.qa] if args.qa else [],
                                        seed=args.seed, overwrite=args.overwrite, **options)))
        return 0
    record = RunRecord(f"data derive {args.transform}", {k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in vars(args).items()})
    from eval.corpus_variants import JsonlRows, is_streaming
    corpus_path = resolve_corpus_path(args.source)  # streamed through transforms that take any re-iterable of rows
    corpus_rows = JsonlRows(corpus_path) if is_streaming(transform.fn) else read_jsonl(corpus_path)
    qa_rows = read_jsonl(args.qa) if args.qa is not None else []
    with record.timed("transform_s"):
        new_corpus, new_qa, stats = transform.fn(corpus_rows, qa_rows, seed=args.seed)
    with atomic_dir(args.out, overwrite=args.overwrite, inputs=inputs) as tmp:
        write_jsonl(tmp / "corpus.jsonl", new_corpus)
        if new_qa is not None and args.qa is not None:
            write_jsonl(tmp / "qa.jsonl", new_qa)
        write_json(tmp / "stats.json", stats)
        record.extra["stats"] = {k: v for k, v in stats.items() if k != "substitutions"}
        record.write(tmp / "run.json")
    print(json.dumps(record.extra["stats"], indent=2))
    return 0
