"""`rag index build --kind KIND`: any index kind of retrievers/index_kinds.py, its flags made from its config."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from core.config import load_config_file
from core.errors import RagError
from core.runinfo import RunRecord
from rag.flags import add_config_file_flag, add_config_flags, flag_values, number, positive_int
from retrievers.index_kinds import INDEX_KINDS, build_index, config_class, index_config

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="build indexes", description="Build indexes over a corpus.")
    verbs = index.add_subparsers(dest="index_cmd", required=True, metavar="VERB")
    kinds = "; ".join(f"{name}: {kind.help}" for name, kind in INDEX_KINDS.items())
    build = verbs.add_parser("build", help=f"build an index ({', '.join(INDEX_KINDS)})",
                             description=f"Build an index folder over a corpus. Kinds: {kinds}. "
                                         "Each kind's options are flags below; a flag of another kind is refused.")
    build.add_argument("--corpus", required=True, type=Path, help="corpus JSONL or a folder holding corpus.jsonl")
    build.add_argument("--out", required=True, type=Path, help="index folder to create")
    build.add_argument("--kind", required=True, help=f"index kind: {' | '.join(INDEX_KINDS)}")
    add_config_file_flag(build, "the kind's config")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index folder (default: off)")
    seen: dict[str, list[str]] = {}
    for name in INDEX_KINDS:
        for f in dataclasses.fields(config_class(name)):
            seen.setdefault(f.name, []).append(name)
    for name in INDEX_KINDS:
        group = build.add_argument_group(f"--kind {name}")
        added = add_config_flags(group, config_class(name), skip=[a.dest for a in build._actions])
        for action in build._actions:
            if action.dest in added and len(seen[action.dest]) > 1:
                action.help = f"{action.help} [kinds: {', '.join(seen[action.dest])}]"
    ray = build.add_argument_group("--kind dense on Ray")
    ray.add_argument("--ray", action="store_true",
                     help="encode shards on a Ray actor pool (local Ray unless --address) (default: off)")
    ray.add_argument("--address", help="with --ray: join this Ray cluster (host:6379 or auto); the output folder "
                     "must be on storage every node sees (default: a local Ray)")
    ray.add_argument("--workers", type=positive_int, help="with --ray: encoder actors (default: the cluster's GPUs "
                     "/ --gpus-per-worker when that is given, else 2)")
    ray.add_argument("--gpus-per-worker", type=number(float, min=0, finite=True), default=0.0,
                     help="with --ray: GPUs per actor (fractions share a GPU; > 0 encodes on cuda in half precision; "
                          "refused when neither the machine nor Ray has a GPU) (default: 0)")
    ray.add_argument("--cpus-per-worker", type=positive_int,
                     help="with --ray: CPUs per actor, also its torch and tokenizer threads (default: 1)")
    build.set_defaults(func=run_build)
    verify = verbs.add_parser("verify", help="check every file of an index folder against its manifest's checksums",
                              description="Recompute the size and sha256 of every file the manifest records and "
                                          "report what is missing, truncated or changed. Exit 1 when anything is.")
    verify.add_argument("index", type=Path, help="index folder")
    verify.add_argument("--json", action="store_true", help="print the whole report as JSON")
    verify.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from index.manifest import verify_index

    report = verify_index(args.index)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.index}: {report['kind']} index, {report['checked']} files checked: "
              + ("ok" if report["ok"] else f"{len(report['problems'])} problem(s)"))
        for problem in report["problems"]:
            print(f"  {problem}")
    return 0 if report["ok"] else 1


def _ray_runtime(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    if not args.ray:
        if args.address or args.workers is not None or args.gpus_per_worker or args.cpus_per_worker is not None:
            raise RagError("--address, --workers, --gpus-per-worker and --cpus-per-worker need --ray")
        return {}
    if args.kind != "dense":
        logger.info("%s indexing is single-process: --ray and its worker flags are ignored", args.kind)
        return {}
    from retrievers.ray_build import ray_encode_shards
    return {"encode_shards": ray_encode_shards(workers=args.workers, gpus_per_worker=args.gpus_per_worker or 0,
                                               cpus_per_worker=args.cpus_per_worker or 1, address=args.address,
                                               batch_size=config.batch_size)}


def run_build(args: argparse.Namespace) -> int:
    cls = config_class(args.kind)  # an unknown kind is a one-line error naming the kinds
    own = {f.name for f in dataclasses.fields(cls)}
    foreign = sorted({f.name for kind in INDEX_KINDS for f in dataclasses.fields(config_class(kind))
                      if f.name not in own and getattr(args, f.name, None) is not None})
    if foreign:
        raise RagError(f"--kind {args.kind} does not take " + ", ".join("--" + n.replace("_", "-") for n in foreign))
    file_cfg = load_config_file(args.config) if args.config else {}
    config = index_config(args.kind, file_cfg, flag_values(cls, args))
    runtime = _ray_runtime(args, config)
    record = RunRecord(f"index build --kind {args.kind}", None)
    with record.timed("build_s"):
        manifest = build_index(args.kind, args.corpus, args.out, config, overwrite=args.overwrite, **runtime)
    record.config = {"kind": args.kind, "corpus": str(args.corpus), **dataclasses.asdict(config)}
    record.write(Path(args.out) / "run.json")
    report = {"out": str(args.out), "kind": manifest["kind"], "counts": manifest.get("counts"),
              "seconds": record.timings["build_s"]}
    dups = (manifest.get("generative") or {}).get("duplicate_titles") or {}
    if dups.get("count"):
        report["duplicate_titles"] = {"count": dups["count"], "documents_not_in_trie": dups.get("extra_docs"),
                                      "see": "duplicates.json"}
    print(json.dumps(report, indent=2))
    return 0

