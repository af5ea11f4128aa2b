"""PNG curves from curves.csv: one figure per split (train losses, dev metrics)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for split in sorted({r["split"] for r in rows}):
        metrics = sorted({r["metric"] for r in rows if r["split"] == split})
        fig, axes = plt.subplots(len(metrics), 1, figsize=(6, 2.2 * len(metrics)), squeeze=False)
        for ax, metric in zip(axes[:, 0], metrics):
            pts = sorted((r["step"], r["value"]) for r in rows if r["split"] == split and r["metric"] == metric)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
            ax.set_ylabel(metric, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{folder.name}: {split}", fontsize=9)
        fig.tight_layout()
        path = folder / f"curves-{split}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
