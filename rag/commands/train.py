"""`rag train retriever --kind dense|generative ...` and `rag train reader --kind fid|causal ...`.

Every trainer is one TRAINERS entry: its typed config (whose fields become the flags, through rag/flags.py),
its train function, the fields it requires, and its full-tuning learning rate. The learning rate of the
other PEFT methods comes from core/peft/registry.py. `--config FILE` fills any field; flags win.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import RagError
from rag.flags import add_config_file_flag, add_config_flags, flag_values
from readers.kinds import READER_KINDS


@dataclass(frozen=True)
class Trainer:
    help: str
    config: str                     # "module:ConfigClass"
    train: str                      # "module:function(config, out, resume=, overwrite=) -> metrics"
    full_lr: float                  # default peak learning rate of full tuning (other methods: the PEFT registry)
    required: tuple[str, ...] = ()
    fixed: dict[str, Any] = field(default_factory=dict)       # fields set by the kind itself
    prepare: str | None = None      # "module:function(values) -> values": resolve run-folder references
    seq2seq: bool = False           # only PEFT methods that fit encoder-decoder models
    summary: tuple[str, ...] = ("trainable_params", "total_params", "trainable_fraction", "seconds_per_step",
                                "peak_rss_mb", "dev")


TRAINERS: dict[str, dict[str, Trainer]] = {
    "retriever": {
        "dense": Trainer("bi-encoder (sentence-transformers) with MNRL, BM25 hard negatives, PEFT, MoE heads",
                         "retrievers.dense_train:DenseTrainConfig", "retrievers.dense_train:train_dense",
                         full_lr=2e-5, required=("corpus", "train")),
        "generative": Trainer("CorpusBrain generative retriever: --stage pretrain (ISS/LPS/HIP) or finetune",
                              "retrievers.generative.train:GenerativeTrainConfig",
                              "retrievers.generative.train:train_generative", full_lr=1e-4, required=("stage",),
                              prepare="retrievers.generative.train:resolve_run_references", seq2seq=True,
                              summary=("stage", "peft", "trainable_params", "total_params", "trainable_fraction",
                                       "train_pairs", "seconds_per_step", "peak_rss_mb", "dev")),
    },
    "reranker": {
        "cross-encoder": Trainer("cross-encoder re-ranker (sentence-transformers CrossEncoderTrainer): BM25 hard "
                                 "negatives, listwise (listnet, the default), pointwise (bce) or mnrl loss, any "
                                 "PEFT method",
                                 "retrievers.rerank:RerankerTrainConfig", "retrievers.rerank:train_reranker",
                                 full_lr=1e-4, required=("corpus", "train"),
                                 summary=("peft", "loss", "trainable_params", "examples", "seconds_per_step",
                                          "train_loss", "dev_step0", "dev")),
    },
    # One entry per reader kind of readers/base.py READER_KINDS: a new reader kind trains with no edit here.
    "reader": {kind: Trainer(f"{kind} reader ({ref.partition(':')[2]}), optionally with CIT (--cit-weight)",
                             "readers.train:ReaderTrainConfig", "readers.train:train_reader", full_lr=1e-4,
                             required=("index", "train"), fixed={"kind": kind},
                             summary=("dev", "seconds_per_step", "peak_rss_mb", "trainable_params", "total_params",
                                      "trainable_fraction", "reader_stats"))
               for kind, ref in READER_KINDS.items()},
}


def _load(ref: str) -> Any:
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def trainer_parser(what: str, kind: str) -> argparse.ArgumentParser:
    from core.peft import PEFT_METHODS, method_names

    spec = TRAINERS[what][kind]
    cls = _load(spec.config)
    parser = argparse.ArgumentParser(prog=f"rag train {what} --kind {kind}", description=spec.help)
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder (default: off)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's last checkpoint (default: off)")
    add_config_file_flag(parser, cls.__name__)
    lrs = ", ".join(f"{m} {PEFT_METHODS[m].default_lr or spec.full_lr:g}" for m in method_names(spec.seq2seq))
    add_config_flags(parser, cls, skip=spec.fixed, required=spec.required,
                     help_overrides={"lr": f"peak learning rate (linear warm-up, then linear decay); per method: {lrs}"})
    for action in parser._actions:
        if action.dest == "peft":  # validated by the trainer, whose error names the allowed methods
            action.help = f"{action.help}; one of: {', '.join(method_names(spec.seq2seq))}"
    return parser


def config_for(what: str, kind: str, args: argparse.Namespace) -> Any:
    """The trainer's config from --config, the flags and the kind; lr from the PEFT registry when not given."""
    from core.config import build_config, load_config_file
    from core.peft import method_lr

    spec = TRAINERS[what][kind]
    cls = _load(spec.config)
    file_cfg = load_config_file(args.config) if args.config else {}
    values = {**file_cfg, **flag_values(cls, args), **spec.fixed}
    missing = [n for n in spec.required if values.get(n) in (None, "")]
    if missing:
        raise RagError(f"rag train {what} --kind {kind}: missing required "
                       + ", ".join("--" + m.replace("_", "-") for m in missing))
    if spec.prepare:
        values = _load(spec.prepare)(values)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    if values.get("lr") is None:
        values["lr"] = method_lr(values.get("peft") or defaults.get("peft") or "full", spec.full_lr)
    return build_config(cls, values)


def parse_trainer_argv(what: str, kind: str, argv: Sequence[str]) -> tuple[Any, argparse.Namespace]:
    args = trainer_parser(what, kind).parse_args(list(argv))
    return config_for(what, kind, args), args


def _kinds_help(what: str) -> str:
    lines = [f"usage: rag train {what} --kind KIND [flags]", "",
             f"Train a {what}. `rag train {what} --kind KIND --help` lists the flags of a kind.", "", "kinds:"]
    lines += [f"  {name:<12} {spec.help}" for name, spec in TRAINERS[what].items()]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train retrievers and readers",
                           description="Train retrievers and readers; every run writes a run folder.")
    verbs = train.add_subparsers(dest="train_what", required=True, metavar="WHAT")
    for what, kinds in TRAINERS.items():
        # prefix_chars="+": every token after the verb goes to the kind's own parser; --kind is taken out in run().
        p = verbs.add_parser(what, help=f"--kind {' | '.join(kinds)}; `rag train {what} --help` lists the kinds",
                             add_help=False, prefix_chars="+")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=run, train_what=what)


def _take_kind(rest: list[str]) -> tuple[str | None, list[str]]:
    for i, token in enumerate(rest):
        if token == "--kind" and i + 1 < len(rest):
            return rest[i + 1], rest[:i] + rest[i + 2:]
        if token.startswith("--kind="):
            return token.split("=", 1)[1], rest[:i] + rest[i + 1:]
    return None, rest


DEV_HEADLINES = ("Rprec", "em", "KILT-em", "f1", "recall@5")


def _say_dev_change(metrics: dict[str, Any]) -> None:
    """The untuned (step 0) and the final dev score side by side on stderr; a drop is said plainly."""
    from core.training.hf import report_change

    before, after = metrics.get("dev_step0") or {}, metrics.get("dev") or {}
    if "reranked" in before and "reranked" in after:  # the re-ranker: its own scores, BM25 beside them
        before, after = before["reranked"], after["reranked"]
    metric = next((m for m in DEV_HEADLINES if isinstance(before.get(m), (int, float))
                   and isinstance(after.get(m), (int, float))), None)
    if metric is not None:
        report_change(before, after, metric)


def run(args: argparse.Namespace) -> int:
    what = args.train_what
    kind, rest = _take_kind(list(args.rest))
    if kind is None and len(TRAINERS[what]) == 1 and rest and "-h" not in rest and "--help" not in rest:
        kind = next(iter(TRAINERS[what]))  # one kind: --kind may be left out
    if kind is None:
        if not rest or "-h" in rest or "--help" in rest:
            print(_kinds_help(what))
            return 0
        raise RagError(f"rag train {what}: --kind is required; choose one of {', '.join(TRAINERS[what])}")
    if kind not in TRAINERS[what]:
        raise RagError(f"unknown {what} kind {kind!r}; choose one of {', '.join(TRAINERS[what])}")
    config, ns = parse_trainer_argv(what, kind, rest)
    spec = TRAINERS[what][kind]
    metrics = _load(spec.train)(config, ns.out, resume=ns.resume, overwrite=ns.overwrite)
    _say_dev_change(metrics)
    summary = {k: metrics.get(k) for k in spec.summary}
    if metrics.get("dev_step0") and "dev_step0" not in summary:
        summary["dev_step0"] = metrics["dev_step0"]
    if "final_train" in metrics:
        summary["final_loss"] = metrics["final_train"].get("loss")
    json.dump({"out": str(ns.out), **summary}, sys.stdout, indent=2, default=str)
    print()
    return 0
