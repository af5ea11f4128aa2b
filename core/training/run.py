"""A training run folder: resolved config, resume check, curves (CSV + PNG), metrics, checkpoints."""
from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Any

from core.errors import RagError
from core.io import read_json, write_json
from core.versions import package_versions

CONFIG, METRICS, CURVES, CHECKPOINTS = "config.json", "metrics.json", "curves.csv", "checkpoints"
# Keys that may differ between a run and its resumption without changing the result.
RESUME_FREE_KEYS = {"max_steps", "eval_every", "save_every", "log_every", "device", "resume", "out"}


def config_dict(config: Any) -> dict[str, Any]:
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


class RunFolder:
    """Owns `out/`; refuses to mix runs: resuming with a different config names the differing keys."""

    def __init__(self, out: str | Path, config: Any, kind: str, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(out)
        self.kind = kind
        self.config = config_dict(config)
        existing = self.path / CONFIG
        if existing.exists() and resume:
            old = read_json(existing)["config"]
            diff = sorted(k for k in set(old) | set(self.config)
                          if k not in RESUME_FREE_KEYS and old.get(k) != self.config.get(k))
            if diff:
                details = "; ".join(f"{k}: run has {old.get(k)!r}, asked {self.config.get(k)!r}" for k in diff)
                raise RagError(f"--resume refused: {self.path} was trained with a different config ({details})")
        elif existing.exists() and not overwrite:
            raise RagError(f"{self.path} already holds a run; pass --resume to continue it or --overwrite")
        elif resume and not existing.exists():
            raise RagError(f"--resume: {self.path} holds no run to resume")
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            (self.path / CURVES).unlink(missing_ok=True)
        write_json(existing, {"kind": kind, "config": self.config, "versions": package_versions()})

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.exists():
            return None
        done = sorted((p for p in self.checkpoints.iterdir() if p.name.startswith("step-")
                       and (p / "state.json").exists()), key=lambda p: int(p.name.split("-")[1]))
        return done[-1] if done else None

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        """Append rows `step,split,metric,value` (long format: any trainer can add any metric)."""
        path = self.path / CURVES
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["step", "split", "metric", "value"])
            for metric, value in values.items():
                writer.writerow([step, split, metric, f"{float(value):.6g}"])
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_curves(self, after_step: int) -> None:
        """On resume, drop curve rows written after the checkpoint we continue from."""
        path = self.path / CURVES
        if not path.exists():
            return
        with open(path, encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= after_step]
        with open(path, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(kept)

    def read_curves(self) -> list[dict[str, Any]]:
        path = self.path / CURVES
        if not path.exists():
            return []
        with open(path, encoding="utf-8") as fh:
            return [{"step": int(r["step"]), "split": r["split"], "metric": r["metric"], "value": float(r["value"])}
                    for r in csv.DictReader(fh)]

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.path / METRICS, metrics)

    def plot(self) -> list[Path]:
        from core.training.plots import plot_curves
        return plot_curves(self.read_curves(), self.path)
