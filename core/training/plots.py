"""PNG curves from curves.csv: one figure per split (train losses, dev metrics).

A panel that would only draw a flat line (a metric constant over the run) or repeat another panel (two metrics
with the same values at every step) is left out and named in the figure's footnote instead, so the panels
that remain are the ones that move. Dev curves start at step 0, the untuned model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def series(rows: list[dict[str, Any]], split: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["split"] == split:
            out.setdefault(r["metric"], []).append((r["step"], r["value"]))
    return {m: sorted(pts) for m, pts in sorted(out.items())}


def split_panels(curves: dict[str, list[tuple[int, float]]]) -> tuple[list[str], dict[str, float], dict[str, str]]:
    """(metrics to draw, constant metrics -> value, duplicate metric -> the drawn metric it repeats)."""
    drawn: list[str] = []
    constant: dict[str, float] = {}
    duplicate: dict[str, str] = {}
    for metric, pts in curves.items():
        values = [v for _, v in pts]
        if len(pts) > 1 and len(set(values)) == 1:
            constant[metric] = values[0]
            continue
        twin = next((m for m in drawn if curves[m] == pts), None)
        if twin is not None:
            duplicate[metric] = twin
            continue
        drawn.append(metric)
    return drawn, constant, duplicate


def _footnote(constant: dict[str, float], duplicate: dict[str, str]) -> str:
    parts = []
    if constant:
        parts.append("constant: " + ", ".join(f"{m}={v:.4g}" for m, v in constant.items()))
    if duplicate:
        parts.append("same as the panel above: " + ", ".join(f"{m} (= {t})" for m, t in duplicate.items()))
    return "; ".join(parts)


def plot_curves(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for split in sorted({r["split"] for r in rows}):
        curves = series(rows, split)
        metrics, constant, duplicate = split_panels(curves)
        if not metrics:  # everything flat: still one panel, so the figure says so
            metrics, constant = [next(iter(curves))], {k: v for k, v in constant.items() if k != next(iter(curves))}
        fig, axes = plt.subplots(len(metrics), 1, figsize=(6, 2.2 * len(metrics) + 0.4), squeeze=False)
        for ax, metric in zip(axes[:, 0], metrics):
            pts = curves[metric]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
            ax.set_ylabel(metric, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{folder.name}: {split}", fontsize=9)
        note = _footnote(constant, duplicate)
        if note:
            fig.text(0.01, 0.005, note, fontsize=6, wrap=True)
        fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
        path = folder / f"curves-{split}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
