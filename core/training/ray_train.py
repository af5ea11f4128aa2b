"""Any `rag train` command on Ray Train: N data-parallel workers (`TorchTrainer`; gloo on CPU, NCCL on GPU).

The driver claims the run folder and launches; every worker imports the trainer's entry function
("module:function"), rebuilds the config and calls `entry(config, out, worker=WorkerInfo)`. transformers'
Trainer finds the process group Ray set up and runs distributed data parallel; worker 0 writes the run folder
(curves, checkpoints, the model, metrics.json). A worker group that fails is restarted (twice at most) and
resumes from the run folder's last checkpoint, so the run folder must be on storage every worker sees (one
machine, or a shared filesystem on a cluster).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import RagError

FAULT_ENV = "RAG_FAULT_KILL_WORKER"  # "RANK:STEP": that worker dies once after that step (tests of recovery)
MAX_FAILURES = 2


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch(entry: str, config: Any, out: str | Path, kind: str, resume: bool, overwrite: bool) -> dict[str, Any]:
    """The driver's part: claim the run folder (its refusals come before any work) and hold it while the
    workers run `entry`; returns the metrics worker 0 wrote."""
    from core.training.run import RunFolder

    with RunFolder(out, config, kind, resume=resume, overwrite=overwrite):
        return run_workers(entry, config, Path(out))


def open_run(out: str | Path, config: Any, kind: str, resume: bool, overwrite: bool,
             worker: WorkerInfo | None) -> tuple[Any, bool]:
    """(run folder, resume?): claimed here outside Ray; inside a worker, the driver's folder, resumed where a
    restarted worker group left off."""
    from core.training.run import RunFolder

    if worker is None:
        return RunFolder(out, config, kind, resume=resume, overwrite=overwrite), resume
    run = RunFolder.attach(out, kind)
    return run, run.latest_checkpoint() is not None


def worker_device(config: Any, worker: WorkerInfo | None) -> str | None:
    """Where this process trains: a Ray worker on its GPU, or its CPU; elsewhere the asked device."""
    if worker is None:
        return config.device
    return "cuda" if config.gpus_per_worker else "cpu"


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def run_workers(entry: str, config: Any, out: Path) -> dict[str, Any]:
    """Run `entry` in `config.workers` Ray Train workers; returns the metrics.json worker 0 wrote."""
    from core.io import read_json
    from core.ray_runtime import ray_session
    from core.training.run import METRICS

    payload = {"entry": entry, "config_class": f"{type(config).__module__}:{type(config).__qualname__}",
               "config": dataclasses.asdict(config), "out": str(out.resolve()),
               "cpus_per_worker": config.cpus_per_worker}
    cpus = config.workers * config.cpus_per_worker
    with ray_session(address=config.address, num_cpus=None if config.address else cpus + 1) as ray, \
            tempfile.TemporaryDirectory(prefix="rag-ray-train-") as ray_storage:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        declared = ray.cluster_resources().get("GPU", 0)
        if config.gpus_per_worker and declared < config.workers * config.gpus_per_worker:
            raise RagError(f"--workers {config.workers} x --gpus-per-worker {config.gpus_per_worker:g}: the Ray "
                           f"cluster declares {declared:g} GPUs")
        resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if config.gpus_per_worker else {})}
        trainer = TorchTrainer(
            _worker, train_loop_config=payload,
            torch_config=TorchConfig(backend="nccl" if config.gpus_per_worker else "gloo"),
            scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=bool(config.gpus_per_worker),
                                         resources_per_worker=resources),
            run_config=RunConfig(name="rag-train", storage_path=ray_storage,  # Ray's own state, not the run's
                                 failure_config=FailureConfig(max_failures=MAX_FAILURES)))
        result = trainer.fit()
        if getattr(result, "error", None):
            raise RagError(f"Ray Train failed: {result.error}")
    return read_json(out / METRICS)


def _worker(payload: dict[str, Any]) -> None:
    import ray.train
    import torch

    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(payload["cpus_per_worker"])))
    config = _load(payload["config_class"])(**payload["config"])
    info = WorkerInfo(context.get_world_rank(), context.get_world_size())
    _load(payload["entry"])(config, Path(payload["out"]), worker=info)


def fault_injection(rank: int, out: Path) -> list[Any]:
    """A callback that kills this worker process once at a given step, when FAULT_ENV asks for it (tests)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return []
    from transformers import TrainerCallback

    kill_rank, kill_step = (int(x) for x in spec.split(":"))
    marker = out / f".fault-injected-{kill_rank}-{kill_step}"

    class _Kill(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if rank == kill_rank and state.global_step == kill_step and not marker.exists():
                marker.write_text("killed once\n")
                os._exit(1)

    return [_Kill()]


def current_worker() -> WorkerInfo:
    """This process's place in a torch.distributed group (rank 0 of 1 outside one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return WorkerInfo(dist.get_rank(), dist.get_world_size())
    return WorkerInfo(0, 1)
