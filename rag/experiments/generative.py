"""CorpusBrain on vital10k + FanOutQA: does pre-training (ISS+LPS+HIP) help the generative retriever?

`rag experiment generative --corpus VITAL10K --train TRAIN.jsonl --dev DEV.jsonl --out DIR [--small]`

Rows (each with ``full`` and ``iaa`` tuning, equal steps and batch):

* (a) fine-tune only: the base model (seq2seq, or a decoder-only LM such as ``--model gemma-3-270m``, which
  writes the title after ``--prompt``) fine-tuned on the training questions;
* (b) pre-train then fine-tune: pre-trained on the corpus's ISS/LPS/HIP pairs, then fine-tuned (same method);
* (c) pre-train only: the pre-trained model evaluated zero-shot;
* low-resource: (a) and (b) again with ``--low-resource`` (10%) of the training questions (the research
  claims pre-training helps most there);
* BM25 and dense (untuned MiniLM) on the same dev questions, from indexes built here (or given with
  ``--bm25-index`` / ``--dense-index``), or read from ``--baselines metrics.json``
  (``{"bm25": {"Rprec": .., "recall@5": .., "queries_per_second": ..}, "dense": {...}}``).

Dev: KILT Rprec / recall@5 / recall@10 of the dev questions (``--dev-limit`` keeps the first N), decoded
under the trie of the whole corpus with beam ``--beams`` (10), every beam a ranked candidate; queries per
second of that decoding (one process, batch 8, on this machine, shared with other jobs: compare rows,
not machines).

The default preset is scaled to a shared 2-core CPU (see PRESETS and the table header): the warm-started
MiniLM bert2bert takes about 2 CPU-seconds per pre-training step of 16 x 64 tokens. Runs finished in
DIR/runs are reused unless ``--overwrite``; their checkpoints/ are deleted unless ``--keep-checkpoints``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import RagError
from core.io import read_json, write_json

logger = logging.getLogger(__name__)


@dataclass
class Preset:
    pretrain_steps: int
    finetune_steps: int
    batch_size: int
    max_source_length: int
    max_source_words: int
    max_pairs: int
    dev_limit: int
    beams: int
    low_resource: float
    eval_batch_size: int = 8


PRESETS = {
    # Sized for a 2-core CPU shared with other jobs (see the module doc).
    "default": Preset(pretrain_steps=100, finetune_steps=60, batch_size=16, max_source_length=32,
                      max_source_words=24, max_pairs=0, dev_limit=0, beams=10, low_resource=0.1),
    "small": Preset(pretrain_steps=3, finetune_steps=3, batch_size=4, max_source_length=32, max_source_words=24,
                    max_pairs=64, dev_limit=4, beams=3, low_resource=0.5),
}
METHODS = ("full", "iaa")
LR = {"full": 2e-4, "iaa": 2e-3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus (vital10k) JSONL or folder")
    parser.add_argument("--train", required=True, help="KILT training questions (FanOutQA train)")
    parser.add_argument("--dev", required=True, help="KILT dev questions (FanOutQA dev)")
    parser.add_argument("--out", required=True, type=Path, help="study folder")
    parser.add_argument("--model", default=None, help="base model: a decoder-only LM (default gemma-3-270m) or a "
                        "seq2seq one (minilm-bert2bert: the warm-started smoke-test model)")
    parser.add_argument("--prompt", default=None, help="decoder-only models: prompt template with {question} "
                        "(default: the trainer's, 'Question: {question}\\nTitle:')")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="label smoothing of the target cross-entropy (default: 0; CorpusBrain uses 0.1)")
    parser.add_argument("--small", action="store_true", help="tiny preset for tests")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated PEFT methods (full, iaa, lora)")
    for name in ("pretrain-steps", "finetune-steps", "batch-size", "max-source-length", "max-source-words",
                 "max-pairs", "dev-limit", "beams", "eval-batch-size"):
        parser.add_argument(f"--{name}", type=int, help="override the preset")
    parser.add_argument("--low-resource", type=float, help="fraction of the training questions (0 = skip)")
    parser.add_argument("--lr-full", type=float, default=LR["full"], help="learning rate of full tuning")
    parser.add_argument("--lr-peft", type=float, default=LR["iaa"], help="learning rate of the PEFT methods")
    parser.add_argument("--tasks", default="iss,lps,hip", help="pre-training tasks, comma-separated")
    parser.add_argument("--baselines", type=Path, help="JSON of BM25 / dense dev metrics instead of running them")
    parser.add_argument("--bm25-index", type=Path, help="an existing BM25 index of the corpus")
    parser.add_argument("--dense-index", type=Path, help="an existing dense index of the corpus")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' checkpoints")
    parser.add_argument("--overwrite", action="store_true", help="retrain runs that already finished")


def _preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS["small" if args.small else "default"]
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Preset)
               if getattr(args, f.name, None) is not None}
    return dataclasses.replace(preset, **changes)


# ---------------------------------------------------------------------------------------------- runs

def _config(args, preset: Preset, method: str, stage: str, init: Path | None, fraction: float, corpus_path: str,
            pairs: Path):
    from retrievers.generative.train import GenerativeTrainConfig

    common = dict(corpus=corpus_path, dev=str(Path(args.dev).resolve()), peft=method,
                  lr=args.lr_full if method == "full" else args.lr_peft, batch_size=preset.batch_size,
                  max_source_length=preset.max_source_length, eval_beams=preset.beams, dev_limit=preset.dev_limit,
                  eval_batch_size=preset.eval_batch_size, seed=args.seed, eval_every=0, save_every=0, log_every=5,
                  label_smoothing=args.label_smoothing, **({"prompt": args.prompt} if args.prompt else {}))
    if stage == "pretrain":
        return GenerativeTrainConfig(stage="pretrain", pairs=str(pairs), tasks=args.tasks, max_pairs=preset.max_pairs,
                                     max_source_words=preset.max_source_words, max_steps=preset.pretrain_steps,
                                     **({"model": args.model} if args.model else {}), **common)
    return GenerativeTrainConfig(stage="finetune", train=str(Path(args.train).resolve()), train_fraction=fraction,
                                 init=str(init.resolve()) if init else None, max_steps=preset.finetune_steps,
                                 **({"model": args.model} if args.model and not init else {}), **common)


def _train(config, out: Path, args, corpus) -> dict[str, Any]:
    from core.training.run import config_dict
    from retrievers.generative.train import train_generative

    done = out / "metrics.json"
    if done.exists() and (out / "generative_run.json").exists() and not args.overwrite:
        if read_json(out / "config.json").get("config") == json.loads(json.dumps(config_dict(config))):
            logger.info("reusing %s", out)
            return read_json(done)
    t0 = time.perf_counter()
    metrics = train_generative(config, out, overwrite=True, corpus=corpus)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(done, metrics)
    if not args.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    gc.collect()
    return metrics


# ---------------------------------------------------------------------------------------------- baselines

def _baseline(kind: str, index: Path, rows: list[dict[str, Any]]) -> dict[str, float]:
    from eval.kilt import evaluate_kilt
    from retrievers import open_retriever

    retriever = open_retriever(index)
    t0 = time.perf_counter()
    hits = retriever.retrieve([r["input"] for r in rows], k=10)
    seconds = time.perf_counter() - t0
    guesses = [{"id": r["id"], "output": [{"provenance": [h.provenance() for h in hs]}]} for r, hs in zip(rows, hits)]
    res = evaluate_kilt(guesses, rows, ks=(5, 10))["retrieval"]
    return {"Rprec": res["Rprec"], "recall@5": res["recall@5"], "recall@10": res["recall@10"],
            "queries_per_second": len(rows) / max(seconds, 1e-9)}


def baselines(args, corpus, rows: list[dict[str, Any]], out: Path) -> dict[str, dict[str, float]]:
    if args.baselines:
        data = read_json(args.baselines)
        return {k: v.get("dev", v) for k, v in data.items() if isinstance(v, dict)}
    from retrievers.bm25 import build_bm25_index

    results = {}
    bm25 = args.bm25_index or out / "bm25"
    if not (bm25 / "manifest.json").exists():
        build_bm25_index(corpus.path, bm25, overwrite=True)
    results["bm25"] = _baseline("bm25", bm25, rows)
    if not args.no_dense:
        from retrievers.dense_build import build_dense_index
        dense = args.dense_index or out / "dense"
        if not (dense / "manifest.json").exists():
            build_dense_index(corpus.path, dense, overwrite=True)
        results["dense"] = _baseline("dense", dense, rows)
    return results


# ---------------------------------------------------------------------------------------------- table

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def build_table(rows: list[dict[str, Any]], header: str) -> str:
    cols = ["setting", "method", "train Qs", "trainable params", "dev Rprec", "dev R@5", "dev R@10",
            "queries/s (beam)", "train s/step", "wall s"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        dev = r.get("dev") or {}
        lines.append("| " + " | ".join([
            r["setting"], r["method"], _fmt(r.get("train_questions")), _fmt(r.get("trainable_params")),
            _fmt(dev.get("Rprec")), _fmt(dev.get("recall@5")), _fmt(dev.get("recall@10")),
            _fmt(dev.get("queries_per_second"), 2), _fmt(r.get("seconds_per_step"), 2), _fmt(r.get("wall_seconds"), 0),
        ]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['setting']}\n{r['method']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    for j, metric in enumerate(("Rprec", "recall@5")):
        ax.bar([i + 0.4 * j for i in range(len(rows))], [(r.get("dev") or {}).get(metric) or 0.0 for r in rows], 0.4,
               label=metric)
    ax.set_xticks([i + 0.2 for i in range(len(rows))], names, fontsize=6)
    ax.set_ylabel("dev (KILT)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "generative_dev.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- driver

def run(args: argparse.Namespace) -> int:
    from core.corpus import Corpus
    from retrievers.generative.pretrain_tasks import PretrainConfig, build_pairs, finetune_pairs, write_pairs
    from retrievers.generative.train import dev_rows

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    preset = _preset(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise RagError("--methods names no method")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus = Corpus.load(args.corpus)
    corpus_path = str(Path(corpus.path).resolve())
    pairs_path = out / "pairs.jsonl"
    stats_path = out / "pairs_stats.json"
    if args.overwrite or not pairs_path.exists() or not stats_path.exists():
        pairs, stats = build_pairs(corpus, PretrainConfig(tasks=args.tasks, max_source_words=preset.max_source_words,
                                                          seed=args.seed))
        write_pairs(pairs_path, pairs)
        write_json(stats_path, stats.to_json())
    pair_stats = read_json(stats_path)
    train_all, train_report = finetune_pairs(args.train, corpus)
    n_train = len(train_all)
    n_low = max(1, round(n_train * preset.low_resource)) if preset.low_resource else 0

    rows: list[dict[str, Any]] = []
    t_base = time.perf_counter()
    dev = dev_rows(corpus, args.dev, preset.dev_limit)
    base = baselines(args, corpus, dev, out)
    baseline_seconds = round(time.perf_counter() - t_base, 1)
    for name, metrics in base.items():
        rows.append({"setting": name.upper() if name == "bm25" else name,
                     "method": "untuned" if name == "dense" else "—", "dev": metrics})

    def row(setting: str, method: str, metrics: dict[str, Any], questions: int | None) -> None:
        rows.append({"setting": setting, "method": method, "train_questions": questions,
                     "trainable_params": metrics.get("trainable_params"), "dev": metrics.get("dev"),
                     "seconds_per_step": metrics.get("seconds_per_step"), "wall_seconds": metrics.get("wall_seconds"),
                     "train_pairs": metrics.get("train_pairs")})

    runs = out / "runs"
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        pt_dir = runs / f"pretrain-{method}"
        cfg = _config(args, preset, method, "pretrain", None, 1.0, corpus_path, pairs_path)
        results[f"pretrain-{method}"] = _train(cfg, pt_dir, args, corpus)
        for fraction, tag in [(1.0, "")] + ([(preset.low_resource, f"-{round(preset.low_resource * 100)}pct")]
                                             if preset.low_resource else []):
            for init, label in ((None, "finetune"), (pt_dir, "pretrain+finetune")):
                key = f"{label}{tag}-{method}"
                cfg = _config(args, preset, method, "finetune", init, fraction, corpus_path, pairs_path)
                results[key] = _train(cfg, runs / key, args, corpus)

    for method in methods:
        row("(a) fine-tune only", method, results[f"finetune-{method}"], n_train)
        row("(b) pre-train + fine-tune", method, results[f"pretrain+finetune-{method}"], n_train)
        row("(c) pre-train only (zero-shot)", method, results[f"pretrain-{method}"], 0)
    if preset.low_resource:
        tag = f"-{round(preset.low_resource * 100)}pct"
        for method in methods:
            row(f"(a) fine-tune only, {round(preset.low_resource * 100)}% Qs", method,
                results[f"finetune{tag}-{method}"], n_low)
            row(f"(b) pre-train + fine-tune, {round(preset.low_resource * 100)}% Qs", method,
                results[f"pretrain+finetune{tag}-{method}"], n_low)

    model_name = args.model or "gemma-3-270m"
    kind = next((m.get("model_kind") for m in results.values() if m.get("model_kind")), None)
    if kind == "causal":
        model_name += f" (decoder-only; prompt {results[f'pretrain-{methods[0]}'].get('prompt')!r})"
    header = (f"## CorpusBrain generative retrieval ({'small preset' if args.small else 'default preset'})\n\n"
              f"Model: {model_name}. Corpus: {len(corpus):,} documents ({corpus.path}). Pre-training: "
              f"{preset.pretrain_steps} steps x batch {preset.batch_size} on a random sample of the "
              f"{sum(pair_stats['pairs'].values()):,} ISS/LPS/HIP pairs ({pair_stats['pairs']}; sources cut to "
              f"{preset.max_source_words} words, HIP centred on the anchor; title-match anchors: "
              f"{pair_stats['title_matching']}). Fine-tuning: {preset.finetune_steps} steps x batch "
              f"{preset.batch_size} "
              f"on {n_train} training questions ({train_report.skipped_no_gold_in_corpus} skipped: gold page not in "
              f"the corpus); low-resource rows use {n_low} of them. Max source length {preset.max_source_length} "
              f"tokens. LR full {args.lr_full:g}, PEFT {args.lr_peft:g}. Dev: {len(dev)} questions, beam "
              f"{preset.beams} under the trie of all {len(corpus):,} titles; BM25 / dense: top 10 of their "
              f"own indexes. Queries/s: one process on a shared 2-core CPU (load varies; compare rows only).")
    table = build_table(rows, header)
    png = plot(rows, out)
    md = table + f"\n\n![dev]({png.name})\n"
    (out / "generative.md").write_text(md, encoding="utf-8")
    write_json(out / "generative.json", {
        "preset": dataclasses.asdict(preset), "methods": methods, "seed": args.seed, "model": args.model,
        "model_kind": kind, "prompt": args.prompt, "label_smoothing": args.label_smoothing,
        "corpus": corpus_path, "train": str(args.train), "dev": str(args.dev), "dev_questions": len(dev),
        "train_questions": n_train, "low_resource_questions": n_low, "pair_stats": pair_stats,
        "rows": rows, "runs": {k: {kk: v.get(kk) for kk in ("dev", "trainable_params", "total_params",
                                                             "seconds_per_step", "wall_seconds", "train_pairs",
                                                             "peak_rss_mb")} for k, v in results.items()},
        "baseline_seconds": baseline_seconds, "total_wall_seconds": round(time.perf_counter() - started, 1)})
    print(md)
    return 0
