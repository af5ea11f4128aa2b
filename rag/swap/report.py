"""Reporting: CRP (swapped / baseline, paired on the questions a transform kept), OUT/table.md, OUT/plots/*.png and
OUT/summary.json."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.errors import RagError
from rag.swap.cells import STATUS_FAILED, STATUS_OK, STATUS_UNAVAILABLE, SwapPlan, _flatten, _slug
from rag.swap.config import DEFAULT_METRICS

log = logging.getLogger("rag.swap")

TABLE = "table.md"
SUMMARY = "summary.json"
PLOTS = "plots"
READER_METRICS = ("em", "f1", "KILT-em")


def _baseline_row(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The same model's row on the baseline corpus: same task if there is one, else its first task."""
    candidates = [r for r in rows if r["model"] == row["model"] and r["corpus"] == row.get("baseline")]
    for r in candidates:
        if r["task"] == row["task"]:
            return r
    return candidates[0] if candidates else None


def pair_baselines(rows: Sequence[dict[str, Any]], ks: Sequence[int]) -> None:
    """Where a swapped cell asks a strict subset of its baseline's questions (same task; e.g. counterfactual
    keeps only the questions whose answer it changed), score the baseline's guesses on that subset too:
    row["baseline_metrics"], row["paired_n"]. CRP then compares the same questions."""
    from core.io import read_jsonl
    from eval.kilt import evaluate_kilt

    for row in rows:
        row.pop("baseline_metrics", None)
        row.pop("paired_n", None)
        base = _baseline_row(row, rows) if row.get("baseline") else None
        if (base is None or row.get("status") != STATUS_OK or base.get("status") != STATUS_OK
                or base["task"] != row["task"] or not row.get("task_path") or not base.get("task_path")):
            continue
        try:
            ids = [str(r["id"]).strip() for r in read_jsonl(row["task_path"])]
            gold = {str(r["id"]).strip(): r for r in read_jsonl(base["task_path"])}
            if len(ids) >= len(gold) or not set(ids) <= gold.keys():
                continue
            wanted = set(ids)
            guesses = [g for g in read_jsonl(Path(base["workdir"]) / "guesses.jsonl") if str(g["id"]).strip() in wanted]
            row["baseline_metrics"] = _flatten(evaluate_kilt(guesses, [gold[i] for i in ids], ks=ks))
            row["paired_n"] = len(ids)
        except (RagError, OSError, KeyError) as exc:
            log.warning("cell %s: could not pair with its baseline: %s", row["cell"], exc)


def corpus_relative(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """CRP = swapped / baseline for every row with a baseline (None where either is missing or 0)."""
    out = []
    for row in rows:
        if not row.get("baseline"):
            continue
        base = _baseline_row(row, rows)
        names = metrics or sorted(row.get("metrics") or {})
        crp = {}
        base_metrics = row.get("baseline_metrics") or ((base.get("metrics") or {}) if base else {})
        for m in names:
            value = (row.get("metrics") or {}).get(m)
            ref = base_metrics.get(m) if base else None
            crp[m] = (value / ref) if (row.get("status") == STATUS_OK and base and base.get("status") == STATUS_OK
                                       and isinstance(value, (int, float)) and ref) else None
        out.append({"model": row["model"], "method": row.get("method", ""), "corpus": row["corpus"],
                    "corpus_label": row.get("corpus_label", row["corpus"]), "task": row["task"],
                    "pseudo": row.get("pseudo", False), "baseline": row["baseline"],
                    "baseline_task": base["task"] if base else None,
                    "status": row.get("status"), "baseline_status": base.get("status") if base else None,
                    "swapped": {m: (row.get("metrics") or {}).get(m) for m in names},
                    "original": {m: base_metrics.get(m) if base else None for m in names},
                    "paired_n": row.get("paired_n"), "crp": crp})
    return out


def _table_metrics(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    present = {m for r in rows for m in (r.get("metrics") or {})}
    chosen = [m for m in (metrics or DEFAULT_METRICS) if m in present or not present]
    chosen += [m for m in READER_METRICS if m in present and m not in chosen]
    return chosen


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def format_swap_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """Markdown: every cell, then "original vs swapped" (baseline -> swapped, CRP) per model and corpus."""
    rows = list(rows)
    names = _table_metrics(rows, metrics)
    pseudo_mark = "†"
    any_pseudo = any(r.get("pseudo") for r in rows)

    def task_cell(r: Mapping[str, Any]) -> str:
        return f"{r['task']}{pseudo_mark}" if r.get("pseudo") else r["task"]

    lines = ["### Cells", "",
             "| model | method | corpus | task | status | n | " + " | ".join(names) + " | s |",
             "|" + "---|" * (len(names) + 7)]
    for r in rows:
        m = r.get("metrics") or {}
        status = r.get("status", "")
        if status != STATUS_OK:
            status = f"{status}: {(r.get('error') or r.get('reason') or '')[:80]}"
        lines.append(f"| {r['model']} | {r.get('method') or ''} | {r.get('corpus_label') or r['corpus']} | "
                     f"{task_cell(r)} | {status} | {m.get('n', '')} | " + " | ".join(_fmt(m.get(x)) for x in names)
                     + f" | {r['seconds'] if r.get('seconds') is not None else ''} |")
    crp_rows = corpus_relative(rows, names)
    if crp_rows:
        lines += ["", "### Original vs swapped", "",
                  "Each cell: baseline → swapped (CRP = swapped / baseline; 1.00 = the model did not move).", "",
                  "| model | method | swapped corpus | vs | task | " + " | ".join(names) + " |",
                  "|" + "---|" * (len(names) + 5)]
        label = {r["corpus"]: r.get("corpus_label") or r["corpus"] for r in rows}
        for c in crp_rows:
            cells = []
            for x in names:
                if c["status"] != STATUS_OK or c["baseline_status"] != STATUS_OK:
                    cells.append(c["status"] if c["status"] != STATUS_OK else f"baseline {c['baseline_status']}")
                    continue
                crp = c["crp"][x]
                cells.append(f"{_fmt(c['original'][x])} → {_fmt(c['swapped'][x])} "
                             f"({crp:.2f})" if crp is not None else
                             f"{_fmt(c['original'][x])} → {_fmt(c['swapped'][x])} (–)")
            task = task_cell(c)
            if c["baseline_task"] and c["baseline_task"] != c["task"]:
                task += f" (vs {c['baseline_task']})"
            if c.get("paired_n"):
                task += f" (paired: the {c['paired_n']} questions it keeps)"
            lines.append(f"| {c['model']} | {c['method'] or ''} | {c['corpus_label']} | "
                         f"{label.get(c['baseline'], c['baseline'])} | {task} | " + " | ".join(cells) + " |")
    if any_pseudo:
        lines += ["", f"{pseudo_mark} pseudo-queries (a definition sentence with its term masked -> the term's "
                  "entry), not real questions: compare with care."]
    return "\n".join(lines) + "\n"


def write_plots(rows: Sequence[Mapping[str, Any]], folder: str | Path, metrics: Sequence[str]) -> list[Path]:
    """plots/metric-<m>.png: each metric per model on every corpus; plots/crp-<m>.png: CRP per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r.get("status") == STATUS_OK]
    if not ok:
        return []
    models = list(dict.fromkeys(r["model"] for r in rows))
    method = {r["model"]: r.get("method") or "" for r in rows}
    xlabels = [f"{m}\n({method[m]})" if method[m] else m for m in models]

    def series_key(r: Mapping[str, Any]) -> str:
        name = r.get("corpus_label") or r["corpus"]
        return f"{name} [pseudo]" if r.get("pseudo") else name

    paths: list[Path] = []

    def bars(title: str, series: dict[str, list[float]], path: Path, ylabel: str, hline: float | None = None) -> None:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(models) * max(1, len(series)) / 2), 4.2))
        width = 0.8 / max(1, len(series))
        x = np.arange(len(models))
        for i, (name, values) in enumerate(series.items()):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        if hline is not None:
            ax.axhline(hline, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(x, xlabels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    for metric in metrics:
        series: dict[str, list[float]] = {}
        for r in ok:
            if metric in (r.get("metrics") or {}):
                series.setdefault(series_key(r), [float("nan")] * len(models))[models.index(r["model"])] = \
                    float(r["metrics"][metric])
        if series:
            bars(f"{metric}: original vs swapped corpora", series, folder / f"metric-{_slug(metric)}.png", metric)
        crp_series: dict[str, list[float]] = {}
        labels = {r["corpus"]: r.get("corpus_label") or r["corpus"] for r in rows}
        for c in corpus_relative(rows, [metric]):
            if c["crp"][metric] is not None:
                name = f"{series_key(c)} / {labels.get(c['baseline'], c['baseline'])}"
                crp_series.setdefault(name, [float("nan")] * len(models))[models.index(c["model"])] = \
                    float(c["crp"][metric])
        if crp_series:
            bars(f"CRP ({metric}): swapped / original", crp_series, folder / f"crp-{_slug(metric)}.png",
                 f"CRP {metric}", hline=1.0)
    return paths


def write_report(plan: SwapPlan, rows: Sequence[Mapping[str, Any]], address: str | None, workers: int | None,
                 wall: float, plan_s: float) -> dict[str, int]:
    """OUT/table.md, OUT/plots/*.png and OUT/summary.json of a run (rows: its latest row a cell, paired with
    pair_baselines); returns the number of cells per status."""
    config, out = plan.config, plan.out
    from core.io import atomic_file, write_json
    table = format_swap_table(rows, config.metrics)
    header = (f"## Corpus swap: {config.name}\n\n{config.description.strip()}\n\n" if config.description.strip()
              else f"## Corpus swap: {config.name}\n\n")
    reuse = plan.reuse or {}
    if reuse:
        header += (f"Cells: {reuse.get('reused', 0)} reused from an earlier run, {reuse.get('stale', 0)} stale and "
                   f"recomputed (a model's weights, an index, the data or the settings changed), "
                   f"{reuse.get('retried', 0)} failed or unavailable before and tried again, "
                   f"{reuse.get('new', 0)} new.\n\n")
    with atomic_file(out / TABLE) as fh:
        fh.write(header + table)
    plots = write_plots(rows, out / PLOTS, config.metrics)
    counts = {s: sum(r["status"] == s for r in rows) for s in (STATUS_OK, STATUS_FAILED, STATUS_UNAVAILABLE)}
    write_json(out / SUMMARY, {
        "config": dataclasses.asdict(config), "address": address,
        "workers": config.workers if workers is None else workers,
        "wall_s": round(wall, 1), "plan_s": round(plan_s, 1), "cells": len(plan.cells), "status": counts,
        "reuse": reuse,
        "corpora": {n: {"corpus": str(s.corpus) if s.corpus else None, "tasks": {k: str(v) for k, v in s.tasks.items()},
                        "pseudo": s.pseudo, "unavailable": s.unavailable} for n, s in plan.corpora.items()},
        "crp": corpus_relative(rows, config.metrics), "plots": [str(p) for p in plots]})
    return counts
