"""Running a swap: the results file (one appended row a cell), retries, execution (in this process or on Ray),
run_plan, and run_swap (plan, run, report)."""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from core.errors import RagError
from rag.swap.cells import (
    STATUS_OK,
    CellSpec,
    IndexSpec,
    SwapPlan,
    _attempts_path,
    _failed_row,
    build_index,
    index_ready,
    plan_swap,
    run_cell,
    stale_reason,
)
from rag.swap.config import SwapConfig, load_swap_config, validate_config
from rag.swap.report import TABLE, pair_baselines, write_report

log = logging.getLogger("rag.swap")

RESULTS = "results.jsonl"


# --------------------------------------------------------------------------- results file

def append_row(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one JSON line with a single O_APPEND write, then fsync: a row is either whole or absent."""
    data = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """The latest row of each cell; a torn last line (a crash mid-write) is skipped."""
    latest: dict[str, dict[str, Any]] = {}
    path = Path(path)
    if not path.exists():
        return latest
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d: not a whole row (interrupted write?); ignored", path, lineno)
            continue
        if isinstance(row, dict) and isinstance(row.get("cell"), str):
            latest[row["cell"]] = row
    return latest


# --------------------------------------------------------------------------- execution

def _with_retries(fn: Callable[[], Any], retries: int) -> Any:
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception:
            if attempt == retries:
                raise
            log.warning("attempt %d failed; retrying", attempt + 1, exc_info=True)


def _execute_local(plan: SwapPlan, todo: list[CellSpec], emit: Callable[[dict[str, Any]], None]) -> None:
    """No Ray: index builds, then cells, one by one in this process (same retries and rows)."""
    retries = plan.config.max_retries
    failed_index: dict[str, BaseException] = {}
    for spec in _needed_indexes(plan, todo):
        try:
            _with_retries(lambda spec=spec: build_index(spec), retries)
        except Exception as exc:  # noqa: BLE001 - reported on the cells that need it
            failed_index[spec.dir] = exc
    for cell in todo:
        if cell.index_dir in failed_index:
            emit(_failed_row(cell, failed_index[cell.index_dir]))
            continue
        try:
            emit(_with_retries(lambda cell=cell: run_cell(cell), retries))
        except Exception as exc:  # noqa: BLE001
            emit(_failed_row(cell, exc))


def _set_threads(num_cpus: float) -> None:
    try:
        import torch
        torch.set_num_threads(max(1, int(num_cpus)))
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _ray_build_index(spec: IndexSpec) -> str:
    _set_threads(spec.num_cpus)
    return build_index(spec)


def _ray_run_cell(cell: CellSpec, *index_ready: Any) -> dict[str, Any]:
    _set_threads(cell.model.num_cpus)
    return run_cell(cell, *index_ready)


def _needed_indexes(plan: SwapPlan, todo: Iterable[CellSpec]) -> list[IndexSpec]:
    dirs = dict.fromkeys(c.index_dir for c in todo if c.index_dir and not c.unavailable)
    return [plan.indexes[d] for d in dirs if not index_ready(d)]


def _execute_ray(plan: SwapPlan, todo: list[CellSpec], emit: Callable[[dict[str, Any]], None],
                 address: str | None, workers: int) -> None:
    from core.ray_runtime import ray_session

    retries = plan.config.max_retries
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAG_HOME", "HF_HOME",
                                      "TOKENIZERS_PARALLELISM") if k in os.environ}
    with ray_session(address=address, num_cpus=None if address else workers,
                     runtime_env={"env_vars": env} if env else None) as ray:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        build = ray.remote(_ray_build_index)
        cell_task = ray.remote(_ray_run_cell)
        index_refs = {}
        for spec in _needed_indexes(plan, todo):
            index_refs[spec.dir] = build.options(
                num_cpus=spec.num_cpus, num_gpus=spec.num_gpus if has_gpus else 0,
                max_retries=retries, retry_exceptions=True, name=f"index:{Path(spec.dir).parent.name}/{Path(spec.dir).name}",
            ).remote(spec)
        pending = {}
        for cell in todo:
            deps = [index_refs[cell.index_dir]] if cell.index_dir in index_refs else []
            ref = cell_task.options(
                num_cpus=cell.model.num_cpus, num_gpus=cell.model.num_gpus if has_gpus else 0,
                max_retries=retries, retry_exceptions=True, name=f"cell:{cell.key}",
            ).remote(cell, *deps)
            pending[ref] = cell
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                cell = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - retries are spent: report and go on
                    row = _failed_row(cell, exc)
                emit(row)


def run_plan(plan: SwapPlan, address: str | None = None, workers: int | None = None) -> list[dict[str, Any]]:
    """Run the cells not finished yet; return the latest row of every cell, in plan order."""
    out = plan.out
    results_path = out / RESULTS
    previous = read_results(results_path)
    todo = []
    stale: dict[str, str] = {}
    retried = 0
    for cell in plan.cells:
        row = previous.get(cell.key)
        if row is not None and row.get("status") == STATUS_OK:
            reason = stale_reason(row, cell)
            if reason is None:
                continue
            stale[cell.key] = reason
        elif row is not None:
            retried += 1
        todo.append(cell)
    skipped = len(plan.cells) - len(todo)
    plan.reuse = {"reused": skipped, "stale": len(stale), "retried": retried,
                  "new": len(todo) - len(stale) - retried, "stale_cells": stale}
    workers = plan.config.workers if workers is None else workers
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise RagError(f"workers must be an integer >= 0, got {workers!r}")
    for key, reason in stale.items():
        log.warning("cell %s: its finished result is stale (%s); recomputing", key, reason)
    log.info("%d cells: %d finished before, %d stale and recomputed, %d to run in all (%s)", len(plan.cells), skipped,
             len(stale), len(todo),
             "no Ray" if workers == 0 and not address else f"Ray, {address or f'{workers} local workers'}")

    def emit(row: dict[str, Any]) -> None:
        append_row(results_path, row)
        shown = row.get("error") or row.get("reason") or ", ".join(
            f"{m}={row['metrics'][m]:.4f}" for m in plan.config.metrics if m in row.get("metrics", {}))
        log.info("cell %s: %s %s", row["cell"], row["status"], shown)

    for cell in todo:
        _attempts_path(cell).unlink(missing_ok=True)
    if todo:
        if workers == 0 and not address:
            _execute_local(plan, todo, emit)
        else:
            _execute_ray(plan, todo, emit, address, workers)
    latest = read_results(results_path)
    return [latest[c.key] for c in plan.cells if c.key in latest]


# --------------------------------------------------------------------------- entry points

def run_swap(config_path: str | Path | SwapConfig, out_dir: str | Path, address: str | None = None,
             workers: int | None = None) -> list[dict[str, Any]]:
    """Run (or resume) a swap config; write results.jsonl, table.md, plots/ and summary.json under out_dir.

    Returns the latest row of every cell (plan order): {"cell", "model", "kind", "method", "corpus",
    "corpus_label", "baseline", "task", "pseudo", "status", "metrics", "seconds", "attempts", ...}.
    workers: local Ray CPUs (default: the config's; 0 = no Ray); address: join that Ray cluster instead.
    """
    if isinstance(config_path, SwapConfig):
        config = config_path
        validate_config(config)   # the whole config is checked before any cell runs, however it was made
    else:
        config = load_swap_config(config_path)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise RagError(f"--workers must be an integer >= 0, got {workers!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plan = plan_swap(config, out)
    plan_s = time.perf_counter() - start
    rows = run_plan(plan, address=address, workers=workers)
    wall = time.perf_counter() - start
    pair_baselines(rows, config.ks)
    counts = write_report(plan, rows, address=address, workers=workers, wall=wall, plan_s=plan_s)
    log.info("corpus swap %s: %s in %.1fs (%d cells reused, %d stale and recomputed); table %s", config.name, counts,
             wall, plan.reuse.get("reused", 0), plan.reuse.get("stale", 0), out / TABLE)
    return rows
