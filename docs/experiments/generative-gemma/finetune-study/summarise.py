"""Summarise the Gemma fine-tune-only arms (issue 14, item 3 b/e/f): per arm the mean over seeds, and paired
bootstrap 95% intervals (over questions) of the per-question seed-mean differences. Reads the guess files of
runs/rr/gen3 (see README.md); writes results.json beside this script."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from eval.kilt import per_question
from eval.stats import paired_bootstrap

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/rr/gen3")
PRETRAIN = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/rr/gen4")
GOLD = Path("runs/rr/fanoutqa/dev.jsonl")
METRICS = ("Rprec", "recall@5")
ARMS = {  # arm: (seeds' guess files)
    "bm25": ["runs/rr/bm25-dev.jsonl"],
    "lora 100%": [RUNS / "ft-lora-s0-dev.jsonl"],
    "iaa 100%": [RUNS / "ft-iaa-s0-dev.jsonl", RUNS / "ft-iaa-s1-dev.jsonl"],
    "full 100%": [RUNS / "ft-full-s1-dev.jsonl"],
    "lora 25%": [RUNS / "ft-lora-25pct-s0-dev.jsonl", RUNS / "ft-lora-25pct-s1-dev.jsonl"],
    "lora 10%": [RUNS / "ft-lora-10pct-s0-dev.jsonl", RUNS / "ft-lora-10pct-s1-dev.jsonl"],
    "lora 10% seed 0": [RUNS / "ft-lora-10pct-s0-dev.jsonl"],
    # pre-training over every title once (../pretrain-cover), then the 10% fine-tuning, seed 0
    "pretrain + lora 10%": [PRETRAIN / "pt-ft-10pct-s0-dev.jsonl"],
}
ARMS = {arm: files for arm, files in ARMS.items() if all(Path(f).is_file() for f in files)}
PAIRS = [("iaa 100%", "lora 100%"), ("full 100%", "lora 100%"), ("iaa 100%", "full 100%"),
         ("lora 25%", "lora 100%"), ("lora 10%", "lora 100%"), ("lora 10%", "lora 25%"),
         ("lora 10%", "bm25"), ("lora 100%", "bm25"),
         ("pretrain + lora 10%", "lora 10%"), ("pretrain + lora 10%", "lora 10% seed 0"),
         ("pretrain + lora 10%", "lora 100%")]


def seed_mean(files: list) -> dict[str, list[float]]:
    runs = [per_question(str(f), str(GOLD), metrics=METRICS) for f in files]
    ids = list(runs[0])
    return {m: [sum(r[q][m] for r in runs) / len(runs) for q in ids] for m in METRICS}


def main() -> None:
    scores = {arm: seed_mean(files) for arm, files in ARMS.items()}
    n = len(scores["bm25"]["Rprec"])
    ids = list(per_question(str(ARMS["bm25"][0]), str(GOLD), metrics=("Rprec",)))
    arms = [{"name": arm, "seeds": len(files), "n": n,
             "per_seed": {Path(f).name: {m: sum(v) / n for m, v in seed_mean([f]).items()} for f in files},
             # per question (gold order), so later runs can be paired with these without the guess files
             "per_question": {"ids": ids, **{Path(f).name: seed_mean([f]) for f in files}},
             "metrics": {m: {"mean": sum(v) / n} for m, v in scores[arm].items()}} for arm, files in ARMS.items()]
    diffs = [{"a": a, "b": b, "n": n, **{m: paired_bootstrap(scores[b][m], scores[a][m]) for m in METRICS}}
             for a, b in PAIRS if a in scores and b in scores]
    out = Path(__file__).with_name("results.json")
    out.write_text(json.dumps({"gold": str(GOLD), "arms": arms, "differences (a - b)": diffs}, indent=2) + "\n")
    for arm in arms:
        print(f"{arm['name']:10s} seeds={arm['seeds']} n={n} " +
              " ".join(f"{m} {arm['metrics'][m]['mean']:.4f}" for m in METRICS))
    for d in diffs:
        print(f"{d['a']} - {d['b']}: " + " ".join(
            f"{m} {d[m]['diff']:+.4f} ({d[m]['ci_low']:+.4f} .. {d[m]['ci_high']:+.4f})" for m in METRICS))


if __name__ == "__main__":
    main()
