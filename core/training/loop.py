"""One training loop for every trainer, run by transformers' `Trainer`: AdamW + linear schedule, progress bar,
curves, dev evaluation (at step 0 too), no-pickle checkpoints and exact resume (data order is a function of
(seed, step), RNG saved), mixed precision and gradient accumulation from the library.
"""
from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import RagError
from core.models import pick_device  # noqa: F401  (re-exported: trainers import it from here)
from core.training.config import TrainConfig
from core.training.run import RunFolder

LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    """Wire a model, a batch function and a loss into a run folder; transformers' `Trainer` runs the loop.

    batch_for_step(i) must be deterministic given the config's seed (use EpochSampler): the Trainer walks the
    indices 0, 1, 2, ... in order (one index per micro-batch: `--gradient-accumulation-steps` k gives an
    optimizer step k of them), so a resumed run sees exactly the batches an uninterrupted run would have seen.
    The library brings mixed precision, accumulation, checkpointing of activations, reporters and resume;
    core/training/hf.py keeps checkpoints free of pickle and writes the run folder's curves.
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
        state = self.trainable_state() if self.trainable_state is not None else {
            n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return {n: v.detach().contiguous().cpu() for n, v in state.items()}

    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        if self.load_trainable is not None:
            self.load_trainable(weights)
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)

    def fit(self) -> dict[str, Any]:
        from core.training.hf import step_zero_and_end

        cfg = self.config
        params = [p for p in (self.params or self.model.parameters()) if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter requires grad")
        from core.training.ray_train import current_worker

        self.worker = current_worker()
        if self.worker.world_size == 1 and (getattr(cfg, "workers", 1) > 1 or getattr(cfg, "gpus_per_worker", 0)):
            raise RagError("--workers/--gpus-per-worker: this trainer was not started on Ray Train "
                           "(core/training/ray_train.py run_workers)")
        start_step = 0
        resume_from = self.run.latest_checkpoint() if self.resume else None
        if resume_from is not None:
            start_step = int(resume_from.name.split("-")[1])
            if self.worker.is_main:
                self.run.truncate_curves(start_step)
        else:
            seed_everything(cfg.seed)
        self._last_logs: dict[str, float] = {}
        trainer, callback, progress = self._trainer(params)
        rss_start = current_rss_mb()
        t0 = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        except BaseException:
            progress.close()  # an error message gets a line of its own
            raise
        seconds = time.perf_counter() - t0
        _, dev = step_zero_and_end(callback.dev_by_step)
        if self.save_final is not None and self.worker.is_main:
            self.save_final(self.run.path)
        done = cfg.max_steps - start_step
        metrics = {**count_params(self.model), **self.extra_metrics,
                   "steps": cfg.max_steps, "resumed_from": start_step,
                   "seconds_per_step": seconds / done if done else None,
                   "peak_rss_mb": round(max(peak_rss_mb(), current_rss_mb()), 1),
                   "train_rss_growth_mb": round(max(0.0, current_rss_mb() - rss_start), 1),
                   "peak_gpu_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                                   if torch.cuda.is_available() else None),
                   "precision": "bf16" if getattr(cfg, "bf16", False) else "fp16" if getattr(cfg, "fp16", False)
                   else "fp32",
                   "final_train": {**self._last_logs, **callback.train_logs},
                   "dev_step0": callback.dev_by_step.get(0, {}) if self.evaluate is not None else {},
                   "dev": dev, "workers": self.worker.world_size}
        if self.worker.is_main:
            self.run.write_metrics(metrics)
            metrics["plots"] = [str(p) for p in self.run.plot()]
            self.run.write_metrics(metrics)
        return metrics

    def _trainer(self, params: list[torch.nn.Parameter]) -> tuple[Any, Any, Any]:
        """The transformers Trainer that runs this loop, its run-folder callback and its progress bar."""
        from torch.utils.data import Dataset, SequentialSampler
        from transformers import Trainer, TrainingArguments

        from core.training.hf import (
            RunFolderCallback,
            SafeCheckpoints,
            quiet_progress,
            reporter_callbacks,
            training_arguments,
        )
        from core.training.ray_train import fault_injection

        cfg, loop, world = self.config, self, self.worker.world_size
        accum = int(getattr(cfg, "gradient_accumulation_steps", 1))
        device = str(pick_device(getattr(cfg, "device", None)))

        class _Indices(Dataset):
            """Item i is the index of micro-batch i; batch_for_step turns it into the batch."""
            def __len__(self) -> int:  # every worker takes its share of each optimizer step's micro-batches
                return cfg.max_steps * accum * world

            def __getitem__(self, i: int) -> int:
                return i

        class _LoopTrainer(SafeCheckpoints, Trainer):
            def trainable_state(self) -> dict[str, torch.Tensor]:
                return loop._state()

            def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
                loop._load(state)

            def _get_train_sampler(self, train_dataset: Any = None) -> Any:
                return SequentialSampler(train_dataset or self.train_dataset)

            def create_optimizer(self, model: Any = None) -> Any:
                if self.optimizer is None:
                    self.optimizer = torch.optim.AdamW(params, lr=self.args.learning_rate,
                                                       weight_decay=self.args.weight_decay)
                return self.optimizer

            def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                             num_items_in_batch: Any = None) -> Any:
                loss, logs = model(inputs["batch"])  # through DDP's wrapper when distributed: gradients synced
                if not torch.isfinite(loss.detach()).all():  # before any update is made with it
                    loop._diverged(self.state.global_step + 1, f"the loss is {float(loss.detach())}", logs)
                loop._last_logs = {"loss": float(loss.detach()), **logs}
                return loss

            def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                         metric_key_prefix: str = "eval") -> dict[str, float]:
                metrics = {f"{metric_key_prefix}_{k}": v for k, v in loop._eval().items()}
                self.log(metrics)
                self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
                return metrics

        callback = RunFolderCallback(self.run, evaluates=self.evaluate is not None, extra_logs=lambda: loop._last_logs,
                                     is_main=self.worker.is_main)
        args = training_arguments(TrainingArguments, cfg, self.run.checkpoints, device,
                                  per_device_train_batch_size=1, save_total_limit=self.keep_checkpoints,
                                  eval_strategy="steps" if self.evaluate is not None and cfg.eval_every else "no",
                                  eval_on_start=self.evaluate is not None, remove_unused_columns=False,
                                  dataloader_pin_memory=False, dataloader_drop_last=False,
                                  ddp_find_unused_parameters=True)  # frozen or unused parts of PEFT models
        class _LossModule(torch.nn.Module):
            """The model with the trainer's loss as its forward: what DDP wraps, so that every worker's
            backward pass goes through DDP's gradient all-reduce (a loss closure calling the bare model
            would not)."""
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
                return loop.loss_fn(batch)

        trainer = _LoopTrainer(model=_LossModule(self.model), args=args, train_dataset=_Indices(),
                               eval_dataset=[0] if self.evaluate is not None else None,  # our evaluate() ignores it
                               data_collator=lambda items: {"batch": loop.batch_for_step(int(items[0]))},
                               callbacks=[callback, *reporter_callbacks(cfg, self.run.path, self.worker.is_main),
                                          *(fault_injection(self.worker.rank, self.run.path) if world > 1 else [])])
        progress = quiet_progress(trainer)
        if getattr(cfg, "gradient_checkpointing", False):
            from core.training.hf import enable_gradient_checkpointing
            enable_gradient_checkpointing(self.model)
        return trainer, callback, progress

    def _diverged(self, step: int, what: str, logs: dict[str, float]) -> None:
        """Stop a run whose loss is no longer finite: no update is made with it, nothing is saved over the
        checkpoints already written, no metrics.json claims a finished run."""
        from core.training.hf import diverged

        if getattr(self, "worker", None) is None or self.worker.is_main:
            self.run.log(step, "train", {"loss": float("nan"), **logs})
        raise diverged(step, what, self.config.lr, self.run.checkpoints)

    def _eval(self) -> dict[str, float]:
        assert self.evaluate is not None
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            dev = self.evaluate()
        self.model.train(was_training)
        return dev


def train(loop: TrainLoop) -> dict[str, Any]:
    return loop.fit()
