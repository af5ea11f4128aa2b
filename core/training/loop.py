"""One training loop for every trainer: AdamW + linear schedule, progress bar, curves, dev evaluation,
no-pickle checkpoints and exact resume (data order is a function of (seed, step), RNG saved).
"""
from __future__ import annotations

import math
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from core.errors import RagError
from core.models import check_device
from core.training.checkpoint import load_checkpoint, save_checkpoint, set_rng_state, unflatten_optimizer_state
from core.training.config import TrainConfig
from core.training.run import RunFolder

LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str | None) -> torch.device:
    """The asked device (refused with one line if this machine lacks it), or cuda when there is one, else cpu."""
    check_device(device)
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class EpochSampler:
    """Batch indices for any step, reproducibly: epoch e is permutation(seed + e) of the examples."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = True) -> None:
        if n == 0:
            raise RagError("no training examples (nothing to sample a batch from)")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.per_epoch = self.n // self.batch_size if drop_last else math.ceil(self.n / self.batch_size)

    def indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.per_epoch)
        order = np.random.default_rng(self.seed + epoch).permutation(self.n)
        return order[within * self.batch_size:(within + 1) * self.batch_size].tolist()


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    """The process's resident-memory high-water mark (VmHWM): model loading and data included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_params(model: torch.nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_fraction": trainable / total if total else 0.0}


@dataclass
class TrainLoop:
    """Wire a model, a batch function and a loss into a run folder.

    batch_for_step(step) must be deterministic given the config's seed (use EpochSampler), so a
    resumed run sees exactly the batches an uninterrupted run would have seen.
    """
    run: RunFolder
    model: torch.nn.Module
    config: TrainConfig
    batch_for_step: Callable[[int], Any]
    loss_fn: LossFn
    evaluate: Callable[[], dict[str, float]] | None = None
    save_final: Callable[[Path], None] | None = None
    trainable_state: Callable[[], dict[str, torch.Tensor]] | None = None
    load_trainable: Callable[[dict[str, torch.Tensor]], None] | None = None
    params: Iterable[torch.nn.Parameter] | None = None
    resume: bool = False
    keep_checkpoints: int = 2
    extra_metrics: dict[str, Any] = field(default_factory=dict)

    def _state(self) -> dict[str, torch.Tensor]:
        if self.trainable_state is not None:
            return self.trainable_state()
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        if self.load_trainable is not None:
            self.load_trainable(weights)
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)

    def _save(self, optimizer, scheduler, step: int) -> None:
        save_checkpoint(self.run.checkpoints / f"step-{step}", self._state(), optimizer, scheduler, step)
        done = sorted((p for p in self.run.checkpoints.iterdir() if p.name.startswith("step-")),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def fit(self) -> dict[str, Any]:
        cfg = self.config
        params = [p for p in (self.params or self.model.parameters()) if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter requires grad")
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        def schedule(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / max(cfg.warmup_steps, 1)
            return max(0.0, (cfg.max_steps - step) / max(cfg.max_steps - cfg.warmup_steps, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        start_step = 0
        if self.resume and (ckpt := self.run.latest_checkpoint()) is not None:
            weights, opt_tensors, state = load_checkpoint(ckpt)
            self._load(weights)
            optimizer.load_state_dict(unflatten_optimizer_state(opt_tensors, state["optimizer"]))
            if state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start_step = state["step"]
            self.run.truncate_curves(start_step)
        else:
            seed_everything(cfg.seed)
        rss_start = current_rss_mb()
        peak_rss = rss_start
        step_times: list[float] = []
        dev: dict[str, float] = {}
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=start_step, desc=f"train {self.run.kind}", unit="step",
                   dynamic_ncols=True)
        last_logs: dict[str, float] = {}
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            loss, logs = self.loss_fn(self.batch_for_step(step))
            if not torch.isfinite(loss.detach()).all():
                bar.close()
                self._diverged(step + 1, f"the loss is {float(loss.detach())}", logs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if not torch.isfinite(norm):
                    bar.close()
                    self._diverged(step + 1, f"the gradient norm is {float(norm)}",
                                   {"loss": float(loss.detach()), **logs})
            optimizer.step()
            scheduler.step()
            step_times.append(time.perf_counter() - t0)
            peak_rss = max(peak_rss, current_rss_mb())
            done = step + 1
            last_logs = {"loss": float(loss.detach()), **logs}
            if (cfg.log_every and done % cfg.log_every == 0) or done == cfg.max_steps or done == 1:
                self.run.log(done, "train", {**last_logs, "lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{last_logs['loss']:.4f}")
            bar.update(1)
            if self.evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps:
                dev = self._eval(done)
            if cfg.save_every and done % cfg.save_every == 0 and done != cfg.max_steps:
                self._save(optimizer, scheduler, done)
        bar.close()
        if self.evaluate is not None:
            dev = self._eval(cfg.max_steps)
        self._save(optimizer, scheduler, cfg.max_steps)
        if self.save_final is not None:
            self.save_final(self.run.path)
        metrics = {**count_params(self.model), **self.extra_metrics,
                   "steps": cfg.max_steps, "resumed_from": start_step,
                   "seconds_per_step": float(np.mean(step_times)) if step_times else None,
                   "peak_rss_mb": round(peak_rss, 1), "train_rss_growth_mb": round(peak_rss - rss_start, 1),
                   "peak_gpu_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                                   if torch.cuda.is_available() else None),
                   "final_train": last_logs, "dev": dev}
        self.run.write_metrics(metrics)
        metrics["plots"] = [str(p) for p in self.run.plot()]
        self.run.write_metrics(metrics)
        return metrics

    def _diverged(self, step: int, what: str, logs: dict[str, float]) -> None:
        """Stop a run whose loss or gradients are no longer finite: no update is made with them, nothing is
        saved over the checkpoints already written, no metrics.json claims a finished run."""
        self.run.log(step, "train", {"loss": float("nan"), **logs})
        last = self.run.latest_checkpoint()
        kept = (f"the last checkpoint before it is kept at {last}" if last is not None
                else "no checkpoint had been saved yet")
        raise RagError(f"training diverged at step {step}: {what} (lr {self.config.lr:g}); the run is stopped, "
                       f"{kept}. A lower --lr (or --grad-clip) usually helps")

    def _eval(self, step: int) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            dev = self.evaluate()
        self.model.train()
        self.run.log(step, "dev", dev)
        return dev


def train(loop: TrainLoop) -> dict[str, Any]:
    return loop.fit()
