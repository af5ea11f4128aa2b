"""Re-ranking study: does a cross-encoder trained on FanOutQA questions lift BM25, in and out of distribution?

`rag experiment rerank --corpus VITAL10K --qa FANOUTQA --bm25-index BM25 --out DIR [--seeds 0,1]`

For each seed, `rag train reranker` trains a MiniLM cross-encoder (BM25 hard negatives) on the training
questions; BM25's top `--depth` candidates of the dev questions (single-hop, the training style) and of
the shifted set (dev_multihop.jsonl: the multi-hop top-level questions, never trained on) are re-ranked.
Per question KILT R-precision and recall@5; `results.json` holds one arm per system with the seeds, n,
the mean over seeds and a 95% paired-bootstrap interval (over questions) of the difference to BM25.
A finished seed's run folder is reused, so the study can be resumed or extended with more seeds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from core.errors import RagError

SETS = {"dev": "dev.jsonl", "shifted": "dev_multihop.jsonl"}
METRICS = ("Rprec", "recall@5")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, type=Path, help="corpus folder (vital10k)")
    parser.add_argument("--qa", required=True, type=Path,
                        help="rag data prepare fanoutqa folder (train.jsonl, dev.jsonl, dev_multihop.jsonl)")
    parser.add_argument("--bm25-index", required=True, type=Path, help="BM25 index of the corpus")
    parser.add_argument("--out", required=True, type=Path, help="study folder")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--depth", type=int, default=50, help="BM25 candidates re-ranked per question")
    from retrievers.rerank import LOSSES, RerankerTrainConfig  # the study's defaults are the trainer's recipe

    recipe = RerankerTrainConfig()
    parser.add_argument("--steps", type=int, default=recipe.max_steps, help="training steps per seed")
    parser.add_argument("--batch-size", type=int, default=recipe.batch_size,
                        help="examples per training step (listnet/mnrl: questions with their negatives; bce: pairs)")
    parser.add_argument("--lr", type=float, default=recipe.lr, help="peak learning rate")
    parser.add_argument("--negatives", type=int, default=recipe.negatives, help="BM25 hard negatives per question")
    parser.add_argument("--max-length", type=int, default=recipe.max_length, help="tokens per pair")
    parser.add_argument("--peft", default=recipe.peft, help="PEFT method of the re-ranker")
    parser.add_argument("--base", default=recipe.base, help="encoder the cross-encoder starts from")
    parser.add_argument("--loss", default=recipe.loss, choices=list(LOSSES), help="training loss")

def _per_question(guesses: list[dict[str, Any]], gold_rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    from eval.kilt import per_question

    scores = list(per_question(guesses, gold_rows, METRICS).values())
    return {m: [s[m] for s in scores] for m in METRICS}


def run(args: argparse.Namespace) -> int:
    from core.io import read_jsonl, write_json
    from eval.stats import paired_bootstrap
    from retrievers.bm25 import BM25Retriever
    from retrievers.rerank import RerankerTrainConfig, load_reranker, rerank, train_reranker

    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if not seeds:
        raise RagError("--seeds: give at least one seed")
    for name, file in (("train", "train.jsonl"), *SETS.items()):
        if not (args.qa / file).is_file():
            raise RagError(f"{args.qa / file} is missing; run `rag data prepare fanoutqa --out {args.qa} --corpus ...`")
    args.out.mkdir(parents=True, exist_ok=True)
    bm25 = BM25Retriever(args.bm25_index)
    sets: dict[str, dict[str, Any]] = {}
    for name, file in SETS.items():
        gold = read_jsonl(args.qa / file)
        hits = bm25.retrieve([r["input"] for r in gold], k=args.depth)
        cands = [[h.provenance() for h in ranked] for ranked in hits]
        guesses = [{"id": r["id"], "output": [{"provenance": c}]} for r, c in zip(gold, cands)]
        sets[name] = {"gold": gold, "candidates": cands, "bm25": _per_question(guesses, gold)}
    per_seed: dict[str, dict[int, dict[str, list[float]]]] = {name: {} for name in SETS}
    train_info = {}
    for seed in seeds:
        run_dir = args.out / f"reranker-seed{seed}"
        if not (run_dir / "metrics.json").exists():
            config = RerankerTrainConfig(corpus=str(args.corpus), train=str(args.qa / "train.jsonl"), dev=None,
                                         bm25_index=str(args.bm25_index), negatives=args.negatives,
                                         max_length=args.max_length, max_steps=args.steps, batch_size=args.batch_size,
                                         lr=args.lr, warmup_steps=max(1, args.steps // 10), seed=seed,
                                         peft=args.peft, loss=args.loss, log_every=10, base=args.base,
                                         save_every=0)  # no checkpoints: a study run is short and rerun whole
            train_reranker(config, run_dir, overwrite=True)
        train_info[seed] = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        ce = load_reranker(run_dir)
        for name, data in sets.items():
            ranked = rerank(ce, [r["input"] for r in data["gold"]], data["candidates"])
            guesses = [{"id": r["id"], "output": [{"provenance": c}]} for r, c in zip(data["gold"], ranked)]
            per_seed[name][seed] = _per_question(guesses, data["gold"])
    arms: list[dict[str, Any]] = []
    for name, data in sets.items():
        n = len(data["gold"])
        arms.append({"name": f"bm25/{name}", "method": "bm25", "backbone": "bm25s", "set": name, "seeds": [],
                     "n": n, "metrics": {m: {"mean": sum(v) / n} for m, v in data["bm25"].items()}})
        metrics: dict[str, Any] = {}
        for m in METRICS:
            # per question, the mean over seeds; the interval is over questions (paired with BM25)
            mean_over_seeds = [sum(per_seed[name][s][m][i] for s in seeds) / len(seeds) for i in range(n)]
            boot = paired_bootstrap(data["bm25"][m], mean_over_seeds)
            metrics[m] = {"mean": sum(mean_over_seeds) / n,
                          "per_seed": {str(s): sum(per_seed[name][s][m]) / n for s in seeds},
                          "diff_vs_bm25": boot["diff"], "ci95": [boot["ci_low"], boot["ci_high"]]}
        arms.append({"name": f"reranker-{args.peft}/{name}", "method": args.peft, "backbone": args.base,
                     "set": name, "seeds": seeds, "n": n, "metrics": metrics})
    result = {"study": "rerank", "depth": args.depth, "arms": arms,
              "training": {str(s): {k: train_info[s].get(k) for k in ("examples", "seconds_per_step", "train_loss",
                                                                       "trainable_params")} for s in seeds},
              "config": {k: str(v) for k, v in vars(args).items() if k != "func"}}
    write_json(args.out / "results.json", result)
    for arm in arms:
        print(f"{arm['name']:<28} n={arm['n']:<4} " + "  ".join(
            f"{m} {v['mean']:.4f}" + (f" (diff {v['diff_vs_bm25']:+.4f}, 95% CI {v['ci95'][0]:+.4f}..{v['ci95'][1]:+.4f})"
                                      if "ci95" in v else "") for m, v in arm["metrics"].items()))
    return 0
