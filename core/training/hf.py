"""transformers' `Trainer` under the toolkit's rules.

The library runs the loop (mixed precision, gradient accumulation and checkpointing, distributed data
parallelism, resume); this module adds what the toolkit promises on top:

* `ScaleConfig`: the knobs every library-backed `rag train` command shares (`--bf16`, `--fp16`,
  `--gradient-accumulation-steps`, `--gradient-checkpointing`, `--report-to`, `--workers`, ...);
* `SafeCheckpoints`: checkpoints without pickle. transformers writes `optimizer.pt`, `scheduler.pt`,
  `rng_state.pth` and `training_args.bin` with `torch.save`; here the trained weights and optimizer tensors go
  to safetensors and everything else (scheduler, RNG of python/numpy/torch/CUDA, scaler) to JSON;
* `RunFolderCallback`: the run folder's `curves.csv` (train loss, lr, grad norm; dev metrics), an evaluation
  at the last step whatever `--eval-every` says, and the step-0 / final dev scores kept for the summary.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import RagError
from core.training.checkpoint import (  # noqa: F401  (CHECKPOINT_PREFIX, last_checkpoint: re-exported)
    CHECKPOINT_PREFIX,
    flatten_optimizer_state,
    last_checkpoint,
    rng_state,
    set_rng_state,
    unflatten_optimizer_state,
)
from core.training.config import TrainConfig

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "optimizer_state.json"
REPORTERS = ("none", "csv", "tensorboard", "wandb", "mlflow")
REPORTER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def _check_report_to(value: str) -> None:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in REPORTERS]
    if bad or not names:
        raise ValueError(f"--report-to {value!r}: choose from {', '.join(REPORTERS)} (comma-separated)")


@dataclass
class ScaleConfig(TrainConfig):
    """TrainConfig plus what a library trainer can do: precision, accumulation, checkpointing, workers."""

    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast (GPUs; a CPU without bf16 instructions runs "
                                                       "it far slower than float32)"})
    fp16: bool = field(default=False, metadata={"help": "float16 autocast with loss scaling (GPU only)"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "batches per optimizer step (the effective batch is batch-size x this x workers)", "min": 1})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass: less memory, more time (bench_training_throughput)"})
    report_to: str = field(default="csv", metadata={
        "help": "where curves go besides the run folder's curves.csv: csv (only that), tensorboard, wandb, mlflow",
        "check": _check_report_to})
    workers: int = field(default=1, metadata={
        "help": "training processes on Ray Train (data parallel, --batch-size each; the dense retriever gathers "
                "in-batch negatives across them)", "min": 1})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per worker (needs GPUs or a Ray cluster "
                                                                  "that declares them)", "min": 0, "finite": True})
    cpus_per_worker: int = field(default=1, metadata={"help": "CPUs (and torch threads) per worker", "min": 1})
    address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: a local Ray)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bf16 and self.fp16:
            raise RagError("--bf16 and --fp16 exclude each other: choose one")


def check_scale(config: ScaleConfig, device: str | None = None, model: torch.nn.Module | None = None) -> None:
    """The one-line refusals that must come before any work (the model check once it is loaded). `device`
    defaults to where the run will train: cuda with --gpus-per-worker, else the asked (or picked) device."""
    if device is None:
        from core.models import pick_device
        device = "cuda" if config.gpus_per_worker else str(pick_device(config.device))
    if config.fp16 and not device.startswith("cuda"):
        raise RagError(f"--fp16 needs a CUDA GPU (this run is on {device}); on a CPU train in float32")
    if config.gpus_per_worker and config.address is None and not torch.cuda.is_available():
        raise RagError("--gpus-per-worker: this machine has no GPU and no --address of a Ray cluster with GPUs "
                       "was given")
    if config.workers > 1 or config.gpus_per_worker:
        import importlib.util
        if importlib.util.find_spec("ray.train") is None:
            raise RagError("--workers/--gpus-per-worker need Ray Train: pip install 'ray[train]'")
    for reporter, packages in REPORTER_PACKAGES.items():
        import importlib.util
        if reporter in config.report_to and not any(importlib.util.find_spec(p) for p in packages):
            raise RagError(f"--report-to {reporter} needs the {packages[0]} package: pip install {packages[0]}")
    if model is not None and config.gradient_checkpointing:
        inner = _checkpointable(model)
        if inner is None:
            raise RagError(f"--gradient-checkpointing: {type(model).__name__} cannot checkpoint its layers "
                           "(no transformers model with gradient-checkpointing support inside)")


def _checkpointable(model: torch.nn.Module) -> Any:
    for module in model.modules():
        if getattr(module, "supports_gradient_checkpointing", False):
            return module
    return None


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing on every transformers model inside (frozen inputs still get gradients)."""
    for module in model.modules():
        if not getattr(module, "supports_gradient_checkpointing", False):
            continue
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def training_arguments(cls: Any, config: TrainConfig, output_dir: Path, device: str, **extra: Any) -> Any:
    """TrainingArguments (or a subclass) from a ScaleConfig: one schedule, one seed, no pickled extras."""
    # A plain TrainConfig (a trainer without the scale flags) gets ScaleConfig's defaults.
    report_to = getattr(config, "report_to", "csv")  # tensorboard: reporter_callbacks(), into the run folder
    report = [r.strip() for r in report_to.split(",") if r.strip() not in ("", "none", "csv", "tensorboard")]
    eval_steps = config.eval_every or config.max_steps
    settings = dict(
        output_dir=str(output_dir), max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=getattr(config, "gradient_accumulation_steps", 1), learning_rate=config.lr,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, lr_scheduler_type="linear",
        max_grad_norm=config.grad_clip or float("inf"), seed=config.seed, data_seed=config.seed,
        bf16=getattr(config, "bf16", False), fp16=getattr(config, "fp16", False),  # checkpointing: on the model
        logging_steps=max(1, config.log_every or config.max_steps), logging_first_step=True,
        save_strategy="steps" if config.save_every else "no", save_steps=config.save_every or config.max_steps,
        save_total_limit=2, eval_steps=eval_steps, report_to=report or "none",
        use_cpu=not device.startswith("cuda"), dataloader_drop_last=True, disable_tqdm=False,
        logging_nan_inf_filter=False,  # a diverged step must show as nan, not as the window's average
        ddp_find_unused_parameters=False)
    settings.update(extra)
    return cls(**settings)


TENSORBOARD_DIR = "tensorboard"


def reporter_callbacks(config: Any, run_path: Path, is_main: bool = True) -> list[Any]:
    """`--report-to tensorboard`: event files in the run folder's `tensorboard/` (worker 0 only), not under the
    trainer's checkpoint folder where transformers would put them."""
    if not is_main or "tensorboard" not in getattr(config, "report_to", ""):
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_path / TENSORBOARD_DIR)))]


class SafeCheckpoints:
    """Mixin for a transformers Trainer subclass: checkpoint files in safetensors and JSON only.

    `trainable_state()` / `load_trainable(state)` are the model's trained parameters (PEFT: only the added
    ones); the frozen base is not copied into every checkpoint.
    """

    args: Any
    optimizer: Any
    lr_scheduler: Any
    accelerator: Any
    model: Any

    def trainable_state(self) -> dict[str, torch.Tensor]:
        model = getattr(self.model, "module", self.model)
        return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        model = getattr(self.model, "module", self.model)
        params = dict(model.named_parameters())
        missing = sorted(set(state) - set(params))
        if missing:
            raise RagError(f"checkpoint does not fit the model: unknown parameters {missing[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        from safetensors.torch import save_file

        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state(), str(out / TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        from safetensors.torch import load_file

        path = Path(resume_from_checkpoint) / TRAINABLE_FILE
        if not path.is_file():
            raise RagError(f"{path}: missing; the checkpoint is incomplete (delete it to resume from an earlier one)")
        self.load_trainable(load_file(str(path)))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from safetensors.torch import save_file

        if not self.args.should_save:
            return
        tensors, meta = flatten_optimizer_state(self.optimizer.state_dict())
        save_file(tensors, os.path.join(output_dir, OPTIMIZER_FILE))
        state = {"optimizer": meta, "scheduler": self.lr_scheduler.state_dict()}
        Path(output_dir, STATE_FILE).write_text(json.dumps(state, default=_jsonable), encoding="utf-8")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        from safetensors.torch import load_file

        if checkpoint is None:
            return
        state = json.loads(Path(checkpoint, STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(os.path.join(checkpoint, OPTIMIZER_FILE))
        self.optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizer"]))
        self.lr_scheduler.load_state_dict(state["scheduler"])

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            Path(output_dir, "scaler.json").write_text(json.dumps(scaler.state_dict(), default=_jsonable))

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        path = Path(checkpoint or "", "scaler.json")
        if scaler is not None and checkpoint is not None and path.is_file():
            scaler.load_state_dict(json.loads(path.read_text()))

    def _rng_file(self, folder: str) -> Path:
        return Path(folder, f"rng_state_{self.args.process_index}.json")

    def _save_rng_state(self, output_dir: str) -> None:
        state = rng_state()
        if torch.cuda.is_available():
            state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        os.makedirs(output_dir, exist_ok=True)
        self._rng_file(output_dir).write_text(json.dumps(state), encoding="utf-8")

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._rng_file(checkpoint).is_file():
            return
        state = json.loads(self._rng_file(checkpoint).read_text(encoding="utf-8"))
        set_rng_state(state)
        if torch.cuda.is_available() and "cuda" in state:
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


DEV_SKIP = ("runtime", "samples_per_second", "steps_per_second", "epoch")


class RunFolderCallback:
    """Curves into the run folder, and an evaluation at the last step (built lazily: transformers' base class)."""

    def __new__(cls, run: Any, evaluates: bool, is_main: bool = True,
                extra_logs: Callable[[], dict[str, float]] | None = None) -> Any:
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def __init__(self) -> None:
                self.dev_by_step: dict[int, dict[str, float]] = {}
                self.train_logs: dict[str, float] = {}

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
                if evaluates and state.global_step >= state.max_steps:
                    control.should_evaluate = True  # the end of the run is always evaluated
                return control

            def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                       **kw: Any) -> None:
                logs = logs or {}
                values = {("lr" if k == "learning_rate" else k): float(v) for k, v in logs.items()
                          if k in ("loss", "learning_rate", "grad_norm") and v is not None}
                bad = {k: v for k, v in values.items() if k in ("loss", "grad_norm") and not math.isfinite(v)}
                if bad:
                    if is_main:
                        run.log(state.global_step, "train", values)
                    what = "the loss" if "loss" in bad else "the gradient norm"
                    raise diverged(state.global_step, f"{what} is {next(iter(bad.values()))}", args.learning_rate,
                                   Path(args.output_dir))
                if "loss" in values:
                    if extra_logs is not None:  # the trainer's own figures of its last step (e.g. CIT terms)
                        values = {**{k: v for k, v in extra_logs().items() if k != "loss"}, **values}
                    self.train_logs = values
                    if is_main:
                        run.log(state.global_step, "train", values)

            def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                            **kw: Any) -> None:
                dev = {_strip(k): float(v) for k, v in (metrics or {}).items()
                       if not any(k.endswith(s) for s in DEV_SKIP) and isinstance(v, (int, float))}
                self.dev_by_step[state.global_step] = dev
                if is_main:
                    run.log(state.global_step, "dev", dev)
                    logger.info("dev at step %d: %s", state.global_step, json.dumps(dev))

        return _Callback()


def quiet_progress(trainer: Any) -> Any:
    """Keep transformers' progress bar but not its log lines, which it writes to stdout (the CLI's JSON)."""
    from transformers.trainer_callback import ProgressCallback

    class _Quiet(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            bar: Any = getattr(self, "training_bar", None)
            if bar is not None and logs and "loss" in logs:
                bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

        def close(self) -> None:
            """End the bar's line (before an error message is printed)."""
            bar: Any = getattr(self, "training_bar", None)
            if bar is not None:
                bar.close()
                setattr(self, "training_bar", None)  # noqa: B010 - the base class's attribute

    quiet = _Quiet()
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(quiet)
    return quiet


def train_from(trainer: Any, progress: Any, resume_from: Path | None, max_steps: int) -> tuple[float, int]:
    """`trainer.train()` from `resume_from` (a checkpoint-N folder) or the start; (seconds, steps done here).
    A RagError (divergence) closes the progress bar first, so the error gets a line of its own."""
    import time

    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except RagError:
        progress.close()
        raise
    done = max_steps - (int(resume_from.name[len(CHECKPOINT_PREFIX):]) if resume_from else 0)
    return time.perf_counter() - start, done


def _strip(key: str) -> str:
    key = key.removeprefix("eval_")
    return key.split("_", 1)[1] if key.startswith("kilt-dev_") else key


def diverged(step: int, what: str, lr: float, checkpoints: Path) -> RagError:
    """The error that stops a run whose loss or gradients are no longer finite, naming the checkpoint kept."""
    last = last_checkpoint(checkpoints)
    kept = f"the last checkpoint before it is kept at {last}" if last is not None else "no checkpoint had been saved yet"
    return RagError(f"training diverged at step {step}: {what} (lr {lr:g}); the run is stopped, {kept}. A lower "
                    "--lr (or --grad-clip) usually helps")


def step_zero_and_end(dev_by_step: dict[int, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    if not dev_by_step:
        return {}, {}
    return dev_by_step.get(0, {}), dev_by_step[max(dev_by_step)]


def report_change(before: dict[str, float], after: dict[str, float], metric: str,
                  say: Callable[[str], Any] | None = None) -> None:
    """Print the untuned and the tuned dev score side by side; say plainly when tuning made it worse."""
    if metric not in before or metric not in after:
        return
    change = after[metric] - before[metric]
    line = f"dev {metric}: {before[metric]:.4f} at step 0 (untuned) -> {after[metric]:.4f} at the end ({change:+.4f})"
    if change < 0:
        line += "  WORSE than the untuned model: check --lr, --max-steps and the training data"
    (say or (lambda text: print(text, file=sys.stderr)))(line)
