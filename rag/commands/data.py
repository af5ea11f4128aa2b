"""`rag data prepare NAME --out DIR`: turn the embedded data sets into corpora and KILT task files."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import RagError
from core.io import atomic_dir
from core.runinfo import RunRecord


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare corpora and task data").add_subparsers(dest="data_cmd", required=True)
    prep = data.add_parser("prepare", help="vital10k | fanoutqa | foldoc | enwiki-mini")
    prep.add_argument("name", help="data set: vital10k | fanoutqa | foldoc | enwiki-mini")
    prep.add_argument("--out", required=True, type=Path, help="output folder (corpus.jsonl and/or task files)")
    prep.add_argument("--corpus", type=Path, help="corpus folder (fanoutqa: keep questions whose page is in it)")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace an existing output folder that rag made (default: off)")
    prep.set_defaults(func=run_prepare)
    from rag.commands.plugins import DATA_VERBS
    for verb, module in DATA_VERBS.items():
        p = data.add_parser(verb, help=f"see `rag data {verb} --help`", add_help=False, prefix_chars="+")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_plugin_runner(verb, module))


def _plugin_runner(verb: str, module: str):
    def run(args: argparse.Namespace) -> int:
        from rag.commands.plugins import dispatch
        return dispatch(f"rag data {verb}", module, f"rag data {verb}", args.rest)
    return run


def run_prepare(args: argparse.Namespace) -> int:
    from rag.data.preparers import PREPARERS

    if args.name not in PREPARERS:
        raise RagError(f"unknown data set {args.name!r}; choose one of {', '.join(sorted(PREPARERS))}")
    options = {"corpus_dir": args.corpus} if args.corpus is not None else {}
    record = RunRecord(f"data prepare {args.name}", {"name": args.name, "out": str(args.out), **options})
    # Written in a folder beside --out and renamed into place when complete (an old --out stays whole until then).
    with atomic_dir(args.out, args.overwrite, inputs={"--corpus": args.corpus}) as staging:
        with record.timed("prepare_s"):
            stats = PREPARERS[args.name](staging, **options)
        record.extra["stats"] = stats
        record.write(staging / "run.json")
    print(json.dumps(stats, indent=2, default=str))
    return 0
