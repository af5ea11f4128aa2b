"""Run every benchmark (bench/bench_*.py) one after the other and collect their results.

Each script runs in its own process (`--quick` is passed through) and writes
bench/results/<name>[_quick].json; this collects them into bench/results/summary[_quick].json with
the headline figures and prints every table. Scripts run one at a time on purpose: they measure
ratios on a shared machine, and two benchmarks at once would disturb each other.

Usage: python bench/run_all.py [--quick] [--only encoding,faiss] [--skip trie]
`make bench` runs the full sizes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def headline(name: str, res: dict[str, Any]) -> dict[str, Any]:
    """The figures the benchmarks exist for (goals), where the result has them."""
    h: dict[str, Any] = {}
    if name == "encoding":
        a, b = res.get("part_a"), res.get("part_b")
        if a:
            h["toolkit_vs_plain_encode_ratio"] = a["ratio_encode_total"]
            h["toolkit_vs_plain_build_ratio"] = a["ratio_build_total"]
            h["goal_ratio_0.95_met"] = a["ratio_encode_total"] >= 0.95
        if b:
            ok = [v for v in b["variants"] if v.get("meets_goal_2x_rprec_0.01")]
            h["variants_2x_within_0.01_rprec"] = [(v["variant"], round(v["speedup"], 2), round(v["Rprec_delta"], 4))
                                                  for v in ok]
            h["goal_2x_met"] = bool(ok)
    elif name == "faiss":
        h["recommended"] = res.get("recommended")
        h["goal_recall_0.98_at_10x_met"] = res.get("goal_met")
    elif name == "build_memory":
        h["memory_difference"] = res.get("memory", {}).get("difference")
        h["time_per_passage_ratio"] = res.get("scaling", {}).get("time_per_passage_ratio")
        h["open_mmap_vs_read"] = [r.get("open") for r in res.get("scaling", {}).get("rows", []) if r.get("open")]
    elif name == "readers":
        h["rows"] = [{k: r.get(k) for k in ("variant", "trainable_params", "median_step_s", "peak_rss_mb", "skipped")}
                     for r in res.get("rows", [])]
        h["ratios"] = res.get("ratios")
    elif name == "passage_store_memory":
        h["growth"] = res.get("growth")
        h["goal_10pct_met"] = res.get("goal_met")
    elif name == "corpus_memory":
        h["growth"] = res.get("growth")
        h["goal_10pct_met"] = res.get("goal_met")
        h["outputs_identical"] = res.get("outputs_identical")
    elif name == "bm25":
        sizes = res.get("sizes") or [{"rows": res.get("rows", [])}]  # one size in results before issue 17
        h["rows"] = [{k: r.get(k) for k in ("backend", "passages", "build_s", "index_s", "qps_single", "qps_batch",
                                             "search_peak_mb", "overlap@10_vs_bm25s", "Rprec")}
                     for s in sizes for r in s.get("rows", [])]
        h["faster"] = {s["passages"]: s["winner"] for s in sizes if s.get("winner")}
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", default="", help="comma list of benchmark names (e.g. encoding,faiss)")
    ap.add_argument("--skip", default="", help="comma list of benchmark names to skip")
    ap.add_argument("--timeout", type=float, default=None, help="per benchmark, seconds")
    ap.add_argument("--collect-only", action="store_true",
                    help="run nothing: collect the existing results/*.json into the summary")
    args = ap.parse_args()
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    scripts = sorted(p for p in C.BENCH_DIR.glob("bench_*.py"))
    summary: dict[str, Any] = {"quick": args.quick, "machine": C.machine_info(), "benchmarks": {}}
    started = time.perf_counter()
    for script in scripts:
        name = script.stem[len("bench_"):]
        if (only and name not in only) or name in skip:
            continue
        path = C.result_path(name, args.quick)
        if args.collect_only:
            rc, wall = (0 if path.exists() else "no result file"), 0.0
        else:
            cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=str(C.ROOT), timeout=args.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.perf_counter() - t0
        entry: dict[str, Any] = {"rc": rc, "wall_s": round(wall, 1), "result_file": str(path.relative_to(C.ROOT))}
        if rc == 0 and path.exists():
            res = json.loads(path.read_text())
            entry["command"] = res.get("command")
            entry["finished_utc"] = res.get("finished_utc")
            if args.collect_only:
                entry["wall_s"] = res.get("wall_s")
            entry["headline"] = headline(name, res)
            entry["tables_markdown"] = res.get("tables_markdown", [])
            entry["machine"] = res.get("machine")
        summary["benchmarks"][name] = entry
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    out = C.RESULTS / f"summary{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print("\n# Benchmark summary\n")
    for name, entry in summary["benchmarks"].items():
        print(f"## {name} (rc={entry['rc']}, {entry['wall_s'] or 0:.0f}s)\n")
        for table in entry.get("tables_markdown", []):
            print(table + "\n")
    print(f"wrote {out}")
    failed = [n for n, e in summary["benchmarks"].items() if e["rc"] != 0]
    if failed and not args.collect_only:
        print(f"failed: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
