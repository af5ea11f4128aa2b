"""Benchmark: dense-retriever training throughput and peak memory under the scale knobs (issue 13).

One run of `rag train retriever --kind dense` per configuration, each in its own process (the CLI, as a
user runs it), on the packaged MiniLM with FanOutQA train questions over vital10k and one BM25 hard negative
per example; every configuration takes the same number of examples per optimizer step:

* base: 1 process, batch B;
* ray-2: 2 Ray Train workers x batch B/2 (in-batch negatives gathered: the same loss as batch B);
* accum-2: 1 process, batch B/2 x 2 accumulation steps (two half batches: fewer in-batch negatives);
* ckpt: base + gradient checkpointing;
* gradcache: base with the GradCache loss, embedded B/4 texts at a time;
* bf16: base under bfloat16 autocast.

Reported: examples/s over the training steps (the trainer's own timing: model loading, data mining and Ray
start-up excluded; they are in the wall time), the peak RSS of the training process (VmHWM; with Ray, of
worker 0, the driver excluded), and the ratio to base. The configurations alternate in one run on one
machine; absolute figures depend on what else the machine runs (recorded load average).

Usage: python bench/bench_training_throughput.py [--quick] [--steps 20] [--batch 16] [--peft full]
Writes bench/results/training_throughput.json (training_throughput_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "training_throughput"


def configurations(batch: int) -> dict[str, list[str]]:
    return {
        "base": ["--batch-size", str(batch)],
        "ray-2": ["--batch-size", str(batch // 2), "--workers", "2"],
        "accum-2": ["--batch-size", str(batch // 2), "--gradient-accumulation-steps", "2"],
        "ckpt": ["--batch-size", str(batch), "--gradient-checkpointing"],
        "gradcache": ["--batch-size", str(batch), "--mini-batch-size", str(max(1, batch // 4))],
        "bf16": ["--batch-size", str(batch), "--bf16"],
    }


def bm25_index(work: Path) -> Path:
    out = work / "bm25"
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "rag.cli", "index", "build", "--kind", "bm25", "--corpus",
                        str(C.vital10k()), "--out", str(out)], check=True, cwd=str(C.ROOT), capture_output=True)
    return out


def run_one(name: str, flags: list[str], steps: int, peft: str, work: Path, bm25: Path) -> dict[str, Any]:
    out = work / f"run-{name}"
    cmd = [sys.executable, "-m", "rag.cli", "train", "retriever", "--kind", "dense", "--peft", peft,
           "--corpus", str(C.vital10k()), "--train", str(C.fanoutqa() / "train.jsonl"), "--bm25-index", str(bm25),
           "--max-steps", str(steps), "--max-seq-length", "128", "--eval-every", "0", "--save-every", "0",
           "--log-every", "1", "--batch-sampler", "random", "--seed", "0", "--out", str(out), "--overwrite", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(C.ROOT))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (rc={proc.returncode}): {proc.stderr[-1500:]}")
    m = json.loads((out / "metrics.json").read_text())
    examples = m["examples_per_step"] * (m["steps"] - m["resumed_from"])
    return {"config": name, "flags": " ".join(flags), "steps": steps, "examples_per_step": m["examples_per_step"],
            "workers": m["workers"], "train_seconds": m["train_seconds"], "wall_seconds": round(wall, 1),
            "examples_per_second": examples / m["train_seconds"], "peak_rss_mb": m["peak_rss_mb"],
            "first_loss": (m.get("final_train") or {}).get("loss"), "command": " ".join(cmd[2:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 steps instead of --steps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--peft", default="full")
    ap.add_argument("--bf16-steps", type=int, default=3,
                    help="steps of the bf16 run (bf16 autocast on a CPU without bf16 instructions is very slow)")
    ap.add_argument("--only", default="", help="comma-separated configurations")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    started = time.perf_counter()
    steps = 8 if args.quick else args.steps
    configs = configurations(args.batch)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    load_before = C.load_avg()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        bm25 = bm25_index(work)
        rows: list[dict[str, Any]] = []
        for name, flags in configs.items():
            print(f"[{name}] {' '.join(flags)}", flush=True)
            rows.append(run_one(name, flags, args.bf16_steps if name == "bf16" else steps, args.peft, work, bm25))
            report(rows, args, steps, load_before, started)  # partial results survive a later failure


def report(rows: list[dict[str, Any]], args: argparse.Namespace, steps: int, load_before: list[float],
           started: float) -> None:
    base = next((r for r in rows if r["config"] == "base"), None)
    for r in rows:
        r["throughput_vs_base"] = r["examples_per_second"] / base["examples_per_second"] if base else None
        r["peak_rss_vs_base"] = r["peak_rss_mb"] / base["peak_rss_mb"] if base else None
    table = C.md_table(
        ["config", "flags", "steps", "examples/step", "examples/s", "x base", "peak RSS MB", "x base", "train s", "wall s"],
        [[r["config"], r["flags"], r["steps"], r["examples_per_step"], C.fmt(r["examples_per_second"], 2),
          C.fmt(r["throughput_vs_base"], 2), C.fmt(r["peak_rss_mb"], 0), C.fmt(r["peak_rss_vs_base"], 2),
          C.fmt(r["train_seconds"], 1), C.fmt(r["wall_seconds"], 1)] for r in rows])
    header = (f"Dense training ({args.peft}, MiniLM, {steps} steps (bf16: {args.bf16_steps}), {args.batch} examples "
              "+ 1 BM25 negative each per step, 128 tokens)")
    C.write_result(NAME, args.quick, {"steps": steps, "batch": args.batch, "peft": args.peft,
                                      "load_avg_before": load_before, "load_avg_after": C.load_avg(), "rows": rows},
                   [header + "\n\n" + table], out=args.out, started=started)


if __name__ == "__main__":
    main()
