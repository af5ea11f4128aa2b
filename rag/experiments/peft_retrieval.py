"""PEFT for dense retrieval: every method trained with equal steps and batch, one table and plots.

`rag experiment peft-retrieval --corpus VITAL10K --train TRAIN.jsonl --dev DEV.jsonl --out RUN [--small]`

Rows: the untuned encoder, full, bitfit, lora, prefix, adapter, iaa, iaa + one shared head (domain
batches; the single-head control for MoE) and iaa + MoE (one expert head per domain). Columns:
trainable parameters (count and % of the base encoder), smoothed train loss (multiple-negatives
ranking loss, moving average) after given steps, steps until the smoothed loss first reaches a fixed
threshold, dev KILT Rprec / recall@5 / recall@20, seconds per step and memory.

Scaled down to fit a shared 2-core CPU (the preset is written in the table header): the loss is read
after the steps of ``--loss-at`` instead of 100/300/1000, passages are cut at ``--max-seq-length``
tokens, and the dev pool is the dev gold pages plus ``--eval-docs`` sampled documents (the same for
every method); ``--full-eval`` adds a whole-corpus evaluation at the end (slow on CPU).

Each method trains in its own process by default (``--isolate``) so peak memory is that method's;
``--small`` (tests) runs in-process and says so. Runs already finished in RUN/runs are reused
unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import RagError
from core.io import read_json, write_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    peft: str | None            # None: the untuned encoder
    moe_experts: str = ""       # "" none, "domains" one head per domain, "shared" a single head


METHODS: list[Method] = [
    Method("untuned", None), Method("full", "full"), Method("bitfit", "bitfit"), Method("lora", "lora"),
    Method("prefix", "prefix"), Method("adapter", "adapter"), Method("iaa", "iaa"),
    Method("iaa+shared-head", "iaa", "shared"), Method("iaa+moe", "iaa", "domains"),
]


@dataclass
class Preset:
    steps: int
    batch_size: int
    max_seq_length: int
    eval_docs: int
    eval_bm25_docs: int
    pseudo_queries: int
    loss_at: tuple[int, ...]
    eval_every: int
    smooth: int
    isolate: bool


PRESETS = {
    # Sized for a 2-core CPU shared with other jobs: see the module doc and the table header.
    "default": Preset(steps=60, batch_size=8, max_seq_length=64, eval_docs=200, eval_bm25_docs=3,
                      pseudo_queries=200, loss_at=(15, 30, 45, 60), eval_every=0, smooth=10, isolate=True),
    "small": Preset(steps=6, batch_size=4, max_seq_length=32, eval_docs=0, eval_bm25_docs=0, pseudo_queries=8,
                    loss_at=(2, 4, 6), eval_every=3, smooth=2, isolate=False),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus (vital10k) JSONL or folder")
    parser.add_argument("--train", required=True, help="KILT training questions (FanOutQA train)")
    parser.add_argument("--dev", required=True, help="KILT dev questions (FanOutQA dev)")
    parser.add_argument("--out", required=True, type=Path, help="study folder")
    parser.add_argument("--encoder", default="minilm", help="base encoder (alias, folder or hub id)")
    parser.add_argument("--small", action="store_true", help="tiny preset for tests")
    parser.add_argument("--methods", help=f"comma-separated subset of {', '.join(m.name for m in METHODS)}")
    for name in ("steps", "batch-size", "max-seq-length", "eval-docs", "eval-bm25-docs", "pseudo-queries",
                 "eval-every", "smooth"):
        parser.add_argument(f"--{name}", type=int, help="override the preset")
    parser.add_argument("--loss-at", help="comma-separated steps at which the train loss is reported")
    parser.add_argument("--loss-threshold", type=float,
                        help="train loss for 'steps to reach' (default: halfway from the mean first-step loss "
                             "to the best final loss)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--rank", type=int, help="rank for every method that has one (method defaults otherwise)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="train each method in its own process (honest peak memory)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per training process (on a busy shared CPU, 1 is often much faster)")
    parser.add_argument("--full-eval", action="store_true", help="also evaluate every run on the whole corpus")
    parser.add_argument("--overwrite", action="store_true", help="retrain runs that already finished")


def _preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS["small" if args.small else "default"]
    changes: dict[str, Any] = {}
    for f in ("steps", "batch_size", "max_seq_length", "eval_docs", "eval_bm25_docs", "pseudo_queries", "eval_every",
              "smooth"):
        if getattr(args, f, None) is not None:
            changes[f] = getattr(args, f)
    if args.loss_at:
        changes["loss_at"] = tuple(int(x) for x in args.loss_at.split(","))
    if args.isolate is not None:
        changes["isolate"] = args.isolate
    preset = dataclasses.replace(preset, **changes)
    if "steps" in changes and not args.loss_at:
        preset = dataclasses.replace(preset, loss_at=tuple(sorted({max(1, round(preset.steps * f))
                                                                   for f in (0.25, 0.5, 0.75, 1.0)})))
    return preset


def _methods(args: argparse.Namespace) -> list[Method]:
    if not args.methods:
        return METHODS
    by_name = {m.name: m for m in METHODS}
    unknown = [n for n in args.methods.split(",") if n not in by_name]
    if unknown:
        raise RagError(f"unknown method(s) {unknown}; allowed: {', '.join(by_name)}")
    return [by_name[n] for n in args.methods.split(",")]


def _train_argv(args: argparse.Namespace, preset: Preset, method: Method, bm25: Path, out: Path,
                n_domains: int) -> list[str]:
    from core.peft import method_lr
    from rag.commands.train import TRAINERS

    argv = ["--corpus", str(args.corpus), "--train", str(args.train), "--dev", str(args.dev),
            "--encoder", str(args.encoder), "--peft", method.peft, "--pseudo-queries", str(preset.pseudo_queries),
            "--bm25-index", str(bm25), "--max-seq-length", str(preset.max_seq_length),
            "--eval-docs", str(preset.eval_docs), "--eval-bm25-docs", str(preset.eval_bm25_docs),
            "--max-steps", str(preset.steps),
            "--batch-size", str(preset.batch_size), "--lr", str(method_lr(method.peft, TRAINERS["retriever"]["dense"].full_lr)), "--seed", str(args.seed),
            "--eval-every", str(preset.eval_every), "--save-every", "0", "--log-every", "1",
            "--out", str(out), "--overwrite"]
    if args.rank is not None and method.peft not in ("full", "bitfit"):
        argv += ["--rank", str(args.rank)]
    if method.moe_experts:
        argv += ["--moe-experts", "1" if method.moe_experts == "shared" else str(n_domains)]
    return argv


def _train(args: argparse.Namespace, preset: Preset, method: Method, bm25: Path, out: Path,
           n_domains: int) -> dict[str, Any]:
    argv = _train_argv(args, preset, method, bm25, out, n_domains)
    if preset.isolate:
        cmd = [sys.executable, "-m", "rag.cli", "train", "retriever", "--kind", "dense", *argv]
        env = {**os.environ, "TQDM_DISABLE": os.environ.get("TQDM_DISABLE", "1")}
        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        log = out.parent / f"{out.name}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w", encoding="utf-8") as fh:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            raise RagError(f"training {method.name} failed (exit {code}); see {log}")
    else:
        from rag.commands.train import parse_trainer_argv
        from retrievers.dense_train import train_dense
        config, _ = parse_trainer_argv("retriever", "dense", argv)
        train_dense(config, out, overwrite=True)
    return read_json(out / "metrics.json")


def _untuned(args: argparse.Namespace, preset: Preset, corpus, out: Path, bm25: Path) -> dict[str, Any]:
    """The base encoder on the same dev pool, at the same max sequence length."""
    from retrievers.dense_train import DevEvaluator, load_base
    from retrievers.encoders import DenseEncoder

    if (out / "metrics.json").exists() and not args.overwrite:
        return read_json(out / "metrics.json")
    st = load_base(args.encoder, "cpu", preset.max_seq_length)
    evaluator = DevEvaluator(corpus, args.dev, preset.eval_docs, 0, bm25_index=bm25, bm25_docs=preset.eval_bm25_docs)
    t0 = time.perf_counter()
    dev = evaluator.evaluate(DenseEncoder(st, str(args.encoder)))
    total = sum(p.numel() for p in st.parameters())
    metrics = {"trainable_params": 0, "total_params": total, "encoder_params": total, "trainable_pct_of_encoder": 0.0,
               "dev": dev, "dev_by_domain": evaluator.last_by_domain, "eval_seconds": round(time.perf_counter() - t0, 2),
               **evaluator.describe()}
    write_json(out / "metrics.json", metrics)
    return metrics


def _full_eval(args: argparse.Namespace, corpus, run: Path, preset: Preset) -> dict[str, float]:
    from retrievers.dense_train import DevEvaluator, load_base
    from retrievers.encoders import DenseEncoder, load_encoder

    encoder = (DenseEncoder(load_base(args.encoder, "cpu", preset.max_seq_length), str(args.encoder))
               if not (run / "dense_run.json").exists() else load_encoder(str(run), device="cpu"))
    return DevEvaluator(corpus, args.dev, 0).evaluate(encoder)


# ---------------------------------------------------------------------------------------------- analysis

def read_loss_curve(run: Path, metrics: Sequence[str] = ("mnrl", "loss")) -> list[tuple[int, float]]:
    """The ranking loss: `mnrl` where the run logs it apart (MoE: loss = mnrl + router), else `loss`."""
    import csv
    path = run / "curves.csv"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as fh:
        train = [r for r in csv.DictReader(fh) if r["split"] == "train"]
    for metric in metrics:
        rows = [r for r in train if r["metric"] == metric]
        if rows:
            return sorted((int(r["step"]), float(r["value"])) for r in rows)
    return []


def smooth(curve: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Trailing moving average (the per-step loss of one small batch is noisy)."""
    out, values = [], []
    for step, value in curve:
        values.append(value)
        tail = values[-window:]
        out.append((step, sum(tail) / len(tail)))
    return out


def loss_at(curve: list[tuple[int, float]], step: int) -> float | None:
    return next((v for s, v in curve if s == step), None)


def steps_to(curve: list[tuple[int, float]], threshold: float) -> int | None:
    return next((s for s, v in curve if v <= threshold), None)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def build_table(results: dict[str, dict[str, Any]], preset: Preset, threshold: float | None,
                header: str) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    for name, res in results.items():
        m = res["metrics"]
        curve = res.get("smoothed", [])
        dev = m.get("dev") or {}
        rows.append({
            "method": name,
            "trainable_params": m.get("trainable_params"),
            "trainable_pct_of_encoder": m.get("trainable_pct_of_encoder"),
            **{f"loss@{s}": loss_at(curve, s) for s in preset.loss_at},
            "steps_to_threshold": steps_to(curve, threshold) if curve and threshold is not None else None,
            "Rprec": dev.get("Rprec"), "recall@5": dev.get("recall@5"), "recall@20": dev.get("recall@20"),
            "oracle_recall@20": dev.get("oracle_recall@20"),
            "seconds_per_step": m.get("seconds_per_step"), "peak_rss_mb": m.get("peak_rss_mb"),
            "train_rss_growth_mb": m.get("train_rss_growth_mb"),
            "full_corpus": res.get("full_corpus"),
        })
    cols = (["method", "trainable params", "% of encoder"] + [f"loss@{s}" for s in preset.loss_at]
            + ["steps to loss≤thr", "dev Rprec", "dev R@5", "dev R@20", "s/step", "peak RSS MB", "RSS growth MB"])
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["method"], f"{r['trainable_params']:,}" if r["trainable_params"] is not None else "—",
                 _fmt(r["trainable_pct_of_encoder"], 2)] + [_fmt(r[f"loss@{s}"]) for s in preset.loss_at]
        cells += [_fmt(r["steps_to_threshold"]), _fmt(r["Rprec"]), _fmt(r["recall@5"]), _fmt(r["recall@20"]),
                  _fmt(r["seconds_per_step"], 2), _fmt(r["peak_rss_mb"], 0), _fmt(r["train_rss_growth_mb"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["full_corpus"] for r in rows):
        lines += ["", "Whole-corpus dev evaluation:", "", "| method | Rprec | R@5 | R@20 |", "|---|---|---|---|"]
        for r in rows:
            fc = r["full_corpus"] or {}
            lines.append(f"| {r['method']} | {_fmt(fc.get('Rprec'))} | {_fmt(fc.get('recall@5'))} | "
                         f"{_fmt(fc.get('recall@20'))} |")
    return "\n".join(lines), rows


def topic_table(results: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Per-topic dev Rprec / recall@20: iaa, iaa + shared head, iaa + MoE (router and oracle domain)."""
    names = [n for n in ("untuned", "iaa", "iaa+shared-head", "iaa+moe") if n in results]
    if "iaa+moe" not in names:
        return "", {}
    per = {n: results[n]["metrics"].get("dev_by_domain") or {} for n in names}
    oracle = results["iaa+moe"]["metrics"].get("dev_by_domain_oracle") or {}
    topics = sorted(set().union(*[set(v) for v in per.values()]))
    cols = ["topic", "n"] + [f"{n} R@20" for n in names] + ["iaa+moe (oracle domain) R@20"] + \
        [f"{n} Rprec" for n in names]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    data: dict[str, Any] = {}
    for t in topics:
        n = next((per[m][t]["n"] for m in names if t in per[m]), 0)
        r20 = [per[m].get(t, {}).get("recall@20") for m in names]
        rp = [per[m].get(t, {}).get("Rprec") for m in names]
        data[t] = {"n": n, **{f"{m}/recall@20": v for m, v in zip(names, r20)},
                   **{f"{m}/Rprec": v for m, v in zip(names, rp)},
                   "iaa+moe(oracle)/recall@20": oracle.get(t, {}).get("recall@20")}
        lines.append("| " + " | ".join([t or "(none)", str(n)] + [_fmt(v) for v in r20]
                                       + [_fmt(oracle.get(t, {}).get("recall@20"))] + [_fmt(v) for v in rp]) + " |")
    return "\n".join(lines), data


def plot(results: dict[str, dict[str, Any]], out: Path, threshold: float | None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in results.items():
        curve = res.get("smoothed") or []
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=name)
    if threshold is not None:
        ax.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"threshold {threshold:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("train MNRL loss (moving average)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "peft_retrieval_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    metrics = ["Rprec", "recall@5", "recall@20"]
    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        values = [(results[n]["metrics"].get("dev") or {}).get(metric, 0.0) for n in names]
        ax.bar([i + j * width for i in range(len(names))], values, width, label=metric)
    ax.set_xticks([i + width for i in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("dev (KILT)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "peft_retrieval_dev.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------- driver

def run(args: argparse.Namespace) -> int:
    from core.corpus import Corpus
    from retrievers.bm25 import build_bm25_index
    from retrievers.dense_train import corpus_domains

    preset = _preset(args)
    methods = _methods(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    corpus = Corpus.load(args.corpus)
    n_domains = len(corpus_domains(corpus, "domain"))
    if any(m.moe_experts == "domains" for m in methods) and n_domains < 2:
        raise RagError("iaa+moe needs a corpus with at least two domains")
    bm25 = out / "bm25"
    if not (bm25 / "manifest.json").exists():
        build_bm25_index(corpus.path, bm25, overwrite=True)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        run_dir = out / "runs" / method.name
        t0 = time.perf_counter()
        if method.peft is None:
            metrics = _untuned(args, preset, corpus, run_dir, bm25)
        elif (run_dir / "metrics.json").exists() and (run_dir / "dense_run.json").exists() and not args.overwrite \
                and read_json(run_dir / "metrics.json").get("steps") == preset.steps:
            metrics = read_json(run_dir / "metrics.json")
        else:
            metrics = _train(args, preset, method, bm25, run_dir, n_domains)
        res: dict[str, Any] = {"metrics": metrics, "wall_seconds": round(time.perf_counter() - t0, 1)}
        if method.peft is not None:
            res["curve"] = read_loss_curve(run_dir)
            res["smoothed"] = smooth(res["curve"], preset.smooth)
        if args.full_eval:
            res["full_corpus"] = _full_eval(args, corpus, run_dir, preset)
        results[method.name] = res
        logger.info("%s done in %.0f s: dev %s", method.name, res["wall_seconds"], metrics.get("dev"))
    trained = [r for r in results.values() if r.get("smoothed")]
    threshold = args.loss_threshold
    if threshold is None and trained:
        first = sum(r["smoothed"][0][1] for r in trained) / len(trained)
        best = min(r["smoothed"][-1][1] for r in trained)
        threshold = round(best + 0.5 * (first - best), 3)
    header = (f"## PEFT for dense retrieval ({'small preset' if args.small else 'default preset'})\n\n"
              f"Equal steps and batch for every method: {preset.steps} steps, batch {preset.batch_size} "
              f"(+1 BM25 hard negative each), max_seq_length {preset.max_seq_length}, "
              f"{preset.pseudo_queries} corpus pseudo-queries added to the training questions, seed {args.seed}. "
              f"Train loss = multiple-negatives ranking loss, moving average over {preset.smooth} steps, "
              f"reported after {'/'.join(map(str, preset.loss_at))} steps (scaled down from 100/300/1000). "
              f"'steps to loss≤thr' uses threshold {_fmt(threshold)}. Dev = KILT metrics of the dev questions "
              f"searched against a pool of the dev gold pages + each dev question's top {preset.eval_bm25_docs} BM25 "
              f"documents + {preset.eval_docs or 'all'} sampled corpus documents "
              f"(the same pool for every method){'; whole-corpus numbers below' if args.full_eval else ''}. "
              f"iaa+moe: queries routed by the learned router (no domain given); per-topic table below. "
              f"Memory: peak process RSS during training "
              f"({'each method in its own process' if preset.isolate else 'all methods in ONE process: not comparable'}).")
    table, rows = build_table(results, preset, threshold, header)
    topics_md, topics = topic_table(results)
    plots = plot(results, out, threshold)
    md = table + ("\n\n### Per topic (dev; MoE vs single head)\n\n" + topics_md if topics_md else "") + "\n\n" + \
        "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    (out / "peft_retrieval.md").write_text(md, encoding="utf-8")
    write_json(out / "peft_retrieval.json", {
        "preset": dataclasses.asdict(preset), "seed": args.seed, "encoder": str(args.encoder),
        "corpus": str(args.corpus), "train": str(args.train), "dev": str(args.dev), "loss_threshold": threshold,
        "rows": rows, "per_topic": topics, "plots": [str(p) for p in plots],
        "curves": {n: r.get("curve", []) for n, r in results.items()},
        "wall_seconds": {n: r["wall_seconds"] for n, r in results.items()},
        "total_wall_seconds": round(time.perf_counter() - started, 1)})
    print(md)
    return 0
