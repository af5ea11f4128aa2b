"""Ray-distributed encoding for the dense build: a pool of encoder actors, one shard per task.

`ray_encode_shards(...)` returns an `encode_shards(staging, config) -> int` callable for
`retrievers.dense_build.build_dense_index`. The build itself (passage table, resume, Faiss assembly,
manifest, atomic rename) stays in dense_build; only the encoding loop moves to Ray:

* a Ray Dataset holds one small row per *missing* shard ({shard, start, end}), one block per row;
* `map_batches(EncoderActor, batch_size=1, compute=ActorPoolStrategy(size=workers))` loads the
  encoder once per actor, reads the shard's passages from the staging PassageStore, encodes them and
  writes the shard with `save_shard` (tmp + fsync + rename); it returns only {shard, count}, so embeddings
  go to disk and never through the object store, and memory is bounded by one shard per actor;
* the driver streams the small result rows (`iter_rows`) into a progress bar;
* actors that die are restarted (`max_restarts`) and their shard retried (`max_task_retries`);
  because a shard file appears only when complete, a redone shard is written exactly once.

GPUs: with `gpus_per_worker > 0` each actor reserves that share of a GPU (Ray sets its
CUDA_VISIBLE_DEVICES) and loads the encoder on `cuda`, in half precision and with GPU-sized batches
(retrievers/encoders.py), one encode call per shard. `workers` then defaults to the cluster's GPUs /
gpus_per_worker, and a machine and cluster without any GPU is refused before any work. The driver
never puts a model on a GPU: build_dense_index loads its own copy (dimension, fingerprint) on the CPU.

The staging folder must be visible to every worker: on a multi-node cluster put the output on a
shared filesystem, and install the toolkit (and the encoder) on each node.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

# retrievers first: importing retrievers.dense_build first hits the retrievers <-> dense_build import cycle
# (retrievers/__init__ -> retrievers.dense -> retrievers.dense_build), e.g. in a fresh Ray worker.
import retrievers  # noqa: F401,I001
from core.errors import RagError
from index.passages import PassageStore
from retrievers import dense_build
from retrievers.dense_build import DenseBuildConfig, EncodeReport, save_shard, shard_path, shard_ranges

logger = logging.getLogger(__name__)

# Environment a worker on another node needs to load models the way the driver does.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "RAG_HOME")
DEFAULT_WORKERS = 2  # without GPUs: two actors, as many as a small machine's cores allow


def _shard_complete(staging: Path, shard: int, rows: int) -> bool:
    """A whole shard of `rows` vectors (header, size and memory map checked); a torn one is encoded again."""
    path = shard_path(staging, shard)
    return path.exists() and dense_build.shard_problem(path, rows) is None


def use_cpus(threads: int) -> None:
    """Let this process's tokenizer and torch use `threads` CPUs (the actor's reservation): the tokenizer
    parallelises only when there is more than one; call it before the encoder loads (the tokenizer reads
    its settings once). Torch's thread count is set here only when torch is already imported (see
    `set_torch_threads`), so a torch-free encoder does not pay for importing it."""
    threads = max(1, int(threads))
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the Rust tokenizers' thread pool
    set_torch_threads(threads)


def set_torch_threads(threads: int) -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(max(1, int(threads)))


def _load_encoder(*args: Any, **kwargs: Any) -> Any:
    from retrievers.encoders import load_encoder  # in the actor: the driver need not import torch for it
    return load_encoder(*args, **kwargs)


class EncoderActor:
    """Ray Data callable class: one encoder per actor; each call encodes and saves whole shards.

    `encoder_loader` (default `retrievers.encoders.load_encoder`) is called as load_encoder is, with the
    device this actor was given; `encoder_factory`, a zero-argument callable, replaces it entirely."""

    def __init__(self, staging: str, encoder: str | None, device: str | None, batch_size: int | None,
                 threads: int, encoder_factory: Callable[[], Any] | None = None, passage_precision: str = "auto",
                 token_sort: bool = False, encoder_loader: Callable[..., Any] | None = None) -> None:
        self.staging = Path(staging)
        self.batch_size = batch_size
        use_cpus(threads)
        if encoder_factory is not None:
            self.encoder = encoder_factory()
        else:
            loader = encoder_loader or _load_encoder
            self.encoder = loader(encoder, device=device, batch_size=batch_size,
                                  passage_precision=passage_precision, token_sort=token_sort)
        set_torch_threads(threads)  # loading the encoder imported torch
        self.store = PassageStore(self.staging)
        self.precision = str(getattr(self.encoder, "passage_precision", "") or "")
        self.device = str(getattr(self.encoder, "device", "cpu"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, counts = [], []
        for shard, start, end in zip(batch["shard"], batch["start"], batch["end"]):
            shard, start, end = int(shard), int(start), int(end)
            # A retry after the actor died just past the rename finds the shard done: skip it.
            if not _shard_complete(self.staging, shard, end - start):
                rows = [self.store.get(pid) for pid in range(start, end)]
                # Same encode calls as the local loop (on a CPU chunks of PROGRESS_CHUNK, on a GPU the whole
                # shard; domains for MoE encoders), so batches, and with them the floating-point results,
                # match the single-process build.
                chunk = dense_build.encode_chunk(self.encoder, end - start)
                parts = [dense_build.encode_rows(self.encoder, rows[lo:lo + chunk], self.batch_size)
                         for lo in range(0, len(rows), chunk)]
                emb = np.concatenate(parts)
                if len(emb) != end - start:
                    raise RagError(f"encoder returned {len(emb)} rows for shard {shard}, expected {end - start}")
                save_shard(self.staging, shard, emb)
            shards.append(shard)
            counts.append(end - start)
        return {"shard": np.asarray(shards, dtype=np.int64), "count": np.asarray(counts, dtype=np.int64),
                "precision": np.asarray([self.precision] * len(shards)),
                "device": np.asarray([self.device] * len(shards))}


@contextmanager
def _quiet_ray_data(level: int = logging.ERROR) -> Iterator[None]:
    """Ray Data logs per-run chatter (execution start/finish, 'progress bars disabled') on the driver."""
    data_logger = logging.getLogger("ray.data")
    before = data_logger.level
    data_logger.setLevel(max(level, before))
    try:
        yield
    finally:
        data_logger.setLevel(before)


def _root_cause(exc: BaseException) -> str:
    """The worker's own error line (e.g. 'ValueError: ...'), from the traceback text that Ray's
    RayTaskError / UserCodeException wrappers carry; else the outermost error's first line."""
    pattern = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.*)$")
    found = None
    for line in str(exc).splitlines():
        match = pattern.match(line.strip())
        if match and not match.group(1).startswith("ray."):
            found = f"{match.group(1)}: {match.group(2)}"
    if found:
        return found
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _accepts_remote_args() -> bool:
    """map_batches(**ray_remote_args) is deprecated in Ray 2.60 (removal announced for 2.64)."""
    import ray.data

    params = inspect.signature(ray.data.Dataset.map_batches).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def local_gpu_count() -> int:
    """GPUs this machine shows (CUDA_VISIBLE_DEVICES respected), counted without creating a CUDA context."""
    import torch
    return int(torch.cuda.device_count())


def cluster_gpus(address: str | None, temp_dir: str | os.PathLike | None = None) -> float:
    """GPUs the build's Ray will have: those of a Ray already running in this process, of the cluster at
    `address` (joined briefly to ask), or of this machine (what a local Ray detects)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    if address:
        from core.ray_runtime import ray_session
        with ray_session(address=address, temp_dir=temp_dir) as session:
            return float(session.cluster_resources().get("GPU", 0))
    return float(local_gpu_count())


def check_gpus(gpus_per_worker: float, gpus: float, address: str | None) -> None:
    """Refuse GPU actors that could never start (Ray would wait for them forever)."""
    if gpus_per_worker <= 0:
        return
    where = f"the Ray cluster at {address}" if address else "this machine (and its Ray)"
    if gpus <= 0:
        raise RagError(f"--gpus-per-worker {gpus_per_worker:g} needs a GPU, but {where} has none; "
                       "drop --gpus-per-worker to encode on CPUs")
    if gpus_per_worker > gpus:
        raise RagError(f"--gpus-per-worker {gpus_per_worker:g} asks for more than the {gpus:g} GPU(s) of {where}")


def default_workers(workers: int | None, gpus_per_worker: float, gpus: float) -> int:
    """`workers` as given; else one actor per `gpus_per_worker` share of the GPUs, or DEFAULT_WORKERS on CPUs."""
    if workers is not None:
        return workers
    if gpus_per_worker > 0:
        return max(1, int(gpus / gpus_per_worker + 1e-9))
    return DEFAULT_WORKERS


def ray_encode_shards(workers: int | None = None, gpus_per_worker: float = 0, address: str | None = None,
                      batch_size: int | None = None, cpus_per_worker: float = 1,
                      encoder_factory: Callable[[], Any] | None = None, max_restarts: int = -1,
                      max_task_retries: int = 3, temp_dir: str | os.PathLike | None = None,
                      show_progress: bool = True, encoder_loader: Callable[..., Any] | None = None,
                      ) -> Callable[[Path, DenseBuildConfig], EncodeReport]:
    """An `encode_shards` for build_dense_index that encodes the missing shards on a Ray actor pool.

    Checked here, before any work: the counts, and with gpus_per_worker > 0 that Ray will have a GPU.

    workers: actors (each holds one encoder; None: GPUs / gpus_per_worker with GPUs, else 2);
    gpus_per_worker: GPUs per actor (fractions share a GPU; > 0 puts the encoder on cuda); address: join
    this cluster instead of starting a local Ray; batch_size: encoder batch (default config.batch_size,
    whose None means by device); cpus_per_worker: CPUs reserved per actor, also its torch and tokenizer
    thread count; encoder_factory: picklable zero-argument callable returning an object with
    encode_passage/dim, used instead of load_encoder(config.encoder) (tests, custom encoders);
    encoder_loader: picklable callable used in place of load_encoder, with its arguments (the device
    included); max_restarts: restarts per dead actor (-1 = always replace it); max_task_retries: how
    often one shard is retried on a replacement actor before the build fails (the staging folder keeps
    finished shards, so rerunning the build resumes).
    """
    if workers is not None and workers < 1:
        raise RagError("--workers must be at least 1")
    if gpus_per_worker < 0:
        raise RagError(f"--gpus-per-worker must be at least 0, got {gpus_per_worker:g}")
    if not cpus_per_worker > 0:
        raise RagError(f"--cpus-per-worker must be more than 0, got {cpus_per_worker:g}")
    address = address or os.environ.get("RAY_ADDRESS") or None  # as ray_session reads it
    gpus = cluster_gpus(address, temp_dir) if gpus_per_worker > 0 else 0.0
    check_gpus(gpus_per_worker, gpus, address)
    workers = default_workers(workers, gpus_per_worker, gpus)
    if gpus_per_worker > 0 and workers * gpus_per_worker > gpus + 1e-9:
        logger.warning("%d workers x %g GPUs is more than the %g GPU(s) Ray has: the rest wait for a free GPU",
                       workers, gpus_per_worker, gpus)

    def encode_shards(staging: Path, config: DenseBuildConfig) -> EncodeReport:
        staging = Path(staging).resolve()  # workers need not share the driver's working directory
        store = PassageStore(staging)
        n = len(store)
        store.close()
        ranges = shard_ranges(n, config.shard_size)
        todo = [i for i, (s, e) in enumerate(ranges) if not _shard_complete(staging, i, e - s)]
        if not todo:
            return EncodeReport(0)
        return _run(staging, config, ranges, todo)

    def _run(staging: Path, config: DenseBuildConfig, ranges: list[tuple[int, int]],
             todo: list[int]) -> EncodeReport:
        from core.ray_runtime import ray_session

        local: dict[str, Any] = {}
        if not address:
            local["num_cpus"] = max(os.cpu_count() or 1, int(np.ceil(workers * cpus_per_worker)))
            if gpus_per_worker > 0:
                local["num_gpus"] = int(gpus)  # the count checked above, not a second detection
        with ray_session(address=address, temp_dir=temp_dir, **local) as ray:
            import ray.data

            with warnings.catch_warnings():  # creating the context touches Ray's own deprecated fields
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx = ray.data.DataContext.get_current()
            saved = {k: getattr(ctx, k) for k in ("enable_progress_bars", "print_on_execution_start",
                                                  "enable_auto_log_stats") if hasattr(ctx, k)}
            for k in saved:
                setattr(ctx, k, False)
            items = [{"shard": i, "start": ranges[i][0], "end": ranges[i][1]} for i in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            remote: dict[str, Any] = {}
            if _accepts_remote_args():
                remote = {"max_restarts": max_restarts, "max_task_retries": max_task_retries}
            if address:
                env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
                if env:
                    remote["runtime_env"] = {"env_vars": env}
            device = "cuda" if gpus_per_worker > 0 else config.device
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*ray_remote_args.*deprecated.*")
                out = ds.map_batches(
                    EncoderActor, batch_size=1, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=min(workers, len(todo)), max_tasks_in_flight_per_actor=1),
                    num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None,
                    fn_constructor_kwargs={"staging": str(staging), "encoder": config.encoder, "device": device,
                                           "batch_size": batch_size or config.batch_size,
                                           "threads": max(1, int(cpus_per_worker)),
                                           "encoder_factory": encoder_factory,
                                           "encoder_loader": encoder_loader,
                                           "passage_precision": config.passage_precision,
                                           "token_sort": config.token_sort},
                    **remote)
            done: set[int] = set()
            report = EncodeReport(0)
            bar = tqdm(total=len(ranges), initial=len(ranges) - len(todo), unit="shard",
                       desc=f"encoding ({workers} Ray workers)", dynamic_ncols=True, disable=not show_progress)
            try:
                with _quiet_ray_data():
                    for row in out.iter_rows():  # streams the small {shard, count, precision, device} rows only
                        done.add(int(row["shard"]))
                        report.precisions.update({str(row["precision"])} - {""})
                        report.devices.add(str(row["device"]))
                        bar.update(1)
            except Exception as exc:
                raise RagError(f"Ray encoding failed after {len(done)} of {len(todo)} shards ({_root_cause(exc)}); "
                               f"finished shards are kept in {staging}: rerun the same build to resume") from exc
            finally:
                bar.close()
                for k, v in saved.items():
                    setattr(ctx, k, v)
        missing = [i for i in todo if not _shard_complete(staging, i, ranges[i][1] - ranges[i][0])]
        if missing or set(todo) - done:
            raise RagError(f"Ray encoding finished without shards {sorted(set(missing) | (set(todo) - done))}; "
                           "rerun the build to resume")
        report.shards = len(todo)
        return report

    return encode_shards
