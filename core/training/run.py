"""A training run folder: resolved config, resume check, curves (CSV + PNG), metrics, checkpoints."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
from pathlib import Path
from typing import Any

from core.errors import RagError
from core.io import (
    acquire_output_lock,
    check_output_location,
    read_json,
    release_output_lock,
    remove_output_dir,
    toolkit_kind,
    write_json,
)
from core.versions import package_versions

CONFIG, METRICS, CURVES, CHECKPOINTS = "config.json", "metrics.json", "curves.csv", "checkpoints"
# Keys that may differ between a run and its resumption without changing the result.
RESUME_FREE_KEYS = {"max_steps", "eval_every", "save_every", "log_every", "device", "resume", "out",
                    "mine_workers"}  # mining negatives on more Ray workers gives the same negatives
# Options added after runs were already saved: the value that reproduces what such a run did, so resuming an
# older run is compared against that, not refused for a key it could not have.
ADDED_KEYS = {"positives": "first", "peft_options": ""}


def config_dict(config: Any) -> dict[str, Any]:
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


def _config_inputs(config: dict[str, Any]) -> dict[str, str]:
    """The config's values that name existing files or folders (corpus, train, init, ...): a run must not replace them."""
    found: dict[str, str] = {}
    for key, value in config.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if key != "out" and isinstance(v, str) and v and len(v) < 4096 and Path(v).exists():
                found[f"--{key.replace('_', '-')}"] = v
    return found


class RunFolder:
    """Owns `out/`; refuses to mix runs: resuming with a different config names the differing keys.

    The run holds `out`'s output lock (core.io.output_lock) until `close()`, its garbage collection or the end
    of the process, so a second run to the same folder fails at once. `overwrite` starts from an empty folder:
    the old run (only a toolkit run folder: config.json with kind and config) is renamed aside and deleted,
    checkpoints included. A config whose `max_steps` is below 1 is refused before anything is written.
    """

    _lock: Path | None = None

    def __init__(self, out: str | Path, config: Any, kind: str, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(out)
        self.kind = kind
        self.config = config_dict(config)
        steps = self.config.get("max_steps")
        if isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps < 1:
            raise RagError(f"max_steps must be at least 1 (got {steps}): a run without a training step would "
                           "save the untrained model as a trained run")
        inputs = _config_inputs(self.config)
        check_output_location(self.path)  # never the working folder, the home folder, ...
        self._lock = acquire_output_lock(self.path)
        try:
            self._claim(resume, overwrite, inputs)
        except BaseException:
            self.close()
            raise

    @classmethod
    def attach(cls, out: str | Path, kind: str) -> RunFolder:
        """The run folder of a run another process holds (a training worker): writes curves and metrics, no lock."""
        run = cls.__new__(cls)
        run.path, run.kind = Path(out), kind
        run.config = read_json(run.path / CONFIG)["config"] if (run.path / CONFIG).is_file() else {}
        return run

    def _claim(self, resume: bool, overwrite: bool, inputs: dict[str, str]) -> None:
        existing = self.path / CONFIG
        if self.path.exists() and not self.path.is_dir():
            raise RagError(f"{self.path} is a file, not a run folder; choose another --out")
        if existing.exists() and toolkit_kind(self.path) != "training run":
            raise RagError(f"{self.path} holds a {CONFIG} that is not a training run's; choose another --out")
        if existing.exists() and resume:
            old = read_json(existing)["config"]
            diff = sorted(k for k in set(old) | set(self.config)
                          if k not in RESUME_FREE_KEYS and old.get(k, ADDED_KEYS.get(k)) != self.config.get(k))
            if diff:
                details = "; ".join(f"{k}: run has {old.get(k, ADDED_KEYS.get(k))!r}"
                                    f"{' (it predates the option)' if k not in old and k in ADDED_KEYS else ''}, "
                                    f"asked {self.config.get(k)!r}" for k in diff)
                raise RagError(f"--resume refused: {self.path} was trained with a different config ({details})")
        elif existing.exists() and not overwrite:
            raise RagError(f"{self.path} already holds a run; pass --resume to continue it or --overwrite")
        elif resume and not existing.exists():
            raise RagError(f"--resume: {self.path} holds no run to resume")
        elif existing.exists():  # --overwrite: start from an empty folder, old checkpoints gone
            remove_output_dir(self.path, kind="training run", inputs=inputs)
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            (self.path / CURVES).unlink(missing_ok=True)
        write_json(existing, {"kind": self.kind, "config": self.config, "versions": package_versions()})

    def close(self) -> None:
        """Release the folder's output lock (also done on garbage collection and at exit)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            release_output_lock(lock)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (transformers' `checkpoint-N` layout, core/training/hf.py)."""
        from core.training.checkpoint import last_checkpoint
        return last_checkpoint(self.checkpoints)

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
