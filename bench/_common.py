"""Shared helpers for the benchmarks: offline env, data preparation, machine info, tables, JSON output.

Every benchmark reports RATIOS or side-by-side figures measured in the same run on the same data
(variants alternated, repeated, best or median taken): the machine is shared, so absolute times are
reported for context but never asserted.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def data_dir() -> Path:
    """Where prepared benchmark data lives (RAG_BENCH_DATA, default $RAG_HOME/bench-data)."""
    from core.models import rag_home
    return Path(os.environ.get("RAG_BENCH_DATA", rag_home() / "bench-data")).expanduser()


def vital10k() -> Path:
    """vital10k corpus folder (prepared once with the toolkit's own preparer)."""
    out = data_dir() / "vital10k"
    if not (out / "corpus.jsonl").exists():
        from rag.data.preparers import prepare
        prepare("vital10k", out)
    return out


def fanoutqa() -> Path:
    """FanOutQA KILT files grounded in vital10k (dev.jsonl, train.jsonl)."""
    corpus = vital10k()
    out = data_dir() / "fanoutqa"
    if not (out / "dev.jsonl").exists():
        from rag.data.preparers import prepare
        prepare("fanoutqa", out, corpus_dir=corpus)
    return out


def dev_questions() -> list[dict[str, Any]]:
    with open(fanoutqa() / "dev.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": load_avg(),
        "mem_total_gb": _mem_total_gb(),
    }
    # Called when results are written, after the measurements: importing torch here cannot disturb them.
    # (Benchmarks that do not use torch report its default thread count; Faiss's own is reported too.)
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:
        info["torch"] = "not installed"
    if "faiss" in sys.modules:
        info["faiss_omp_threads"] = sys.modules["faiss"].omp_get_max_threads()
    for env in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(env):
            info[env] = os.environ[env]
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_total_gb() -> float | None:
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions(*dists: str) -> dict[str, str]:
    import importlib.metadata as md
    out = {}
    for d in dists:
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = "not installed"
    return out


def vmhwm_mb() -> float:
    """Peak resident memory of this process (VmHWM: per address space, so unlike ru_maxrss it does not
    inherit the parent's peak across fork+exec); ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:
            return "-"
        ax = abs(x)
        if ax >= 1000:
            return f"{x:,.0f}"
        if ax >= 10:
            return f"{x:.1f}"
        if ax >= 1:
            return f"{x:.2f}"
        return "0" if x == 0 else f"{x:.{digits + 1}f}"
    return str(x)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def result_path(name: str, quick: bool, out: str | Path | None = None) -> Path:
    if out:
        return Path(out)
    return RESULTS / f"{name}{'_quick' if quick else ''}.json"


def write_result(name: str, quick: bool, payload: dict[str, Any], tables: Sequence[str],
                 out: str | Path | None = None, started: float | None = None) -> Path:
    """Write the JSON (machine info, command, tables as markdown, raw figures) and print the tables."""
    path = result_path(name, quick, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "quick": quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.perf_counter() - started, 1) if started else None,
        "machine": machine_info(),
        **payload,
        "tables_markdown": list(tables),
    }
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n", encoding="utf-8")
    for table in tables:
        print(table)
        print()
    print(f"wrote {path}")
    return path


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def run_worker(script: Path, args: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run `python script --worker ARGS` in a fresh process; it prints one JSON line prefixed RESULT:.

    A fresh process per measurement gives each its own ru_maxrss (peak RSS high-water mark).
    """
    import subprocess
    proc = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT:"):
            return json.loads(line[len("RESULT:"):])
    raise RuntimeError(f"worker {script.name} {' '.join(args)} failed (rc={proc.returncode}):\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def emit_worker_result(result: dict[str, Any]) -> None:
    print("RESULT:" + json.dumps(result, default=_json_default), flush=True)
