"""Putting a Faiss index on GPUs: whether it can go, on which devices, sharded or replicated, fp16 or not.

Every decision is a plain function of the CPU index and the device count, so it is tested on a machine
without a GPU; only `clone_to_gpus` touches one. What Faiss can clone follows faiss/gpu/GpuCloner.cpp:
Flat, IVF-Flat, IVF-SQ and IVF-PQ (flat coarse quantizer), SQfp16, behind OPQ/PCA pre-transforms or IDMap.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import RagError
from index.faiss_lib import faiss

# Exact types: a subclass (IndexIVFPQR, IndexIVFFlatDedup) would be cloned as its base and lose what it adds.
GPU_IVF_TYPES = ("IndexIVFFlat", "IndexIVFScalarQuantizer", "IndexIVFPQ")
GPU_FACTORIES = "Flat, IVFn,Flat, IVFn,SQ8, IVFn,PQm, optionally after OPQm/PCAn"
GPU_INSTALL = "pip install -e '.[gpu]' (faiss-gpu-cu12) in place of '.[cpu]'"


def faiss_gpu_build() -> bool:
    """Whether this faiss was built with GPU support (faiss-gpu-cu12; faiss-cpu has no GPU classes)."""
    return hasattr(faiss, "StandardGpuResources")


def gpu_count() -> int:
    """GPUs faiss can use now (0 for a CPU build, or when no CUDA device is visible)."""
    return int(faiss.get_num_gpus()) if faiss_gpu_build() else 0


def describe(index: Any) -> str:
    """A component's Faiss type, with the factory-string part that made it where that helps."""
    name = type(index).__name__
    if isinstance(index, faiss.IndexRefine):
        return f"the refine stage {name} (',RFlat' / ',Refine(...)')"
    if isinstance(index, faiss.IndexHNSW):
        return f"{name} (an HNSW graph)"
    if isinstance(index, (faiss.IndexFastScan, faiss.IndexIVFFastScan)):
        return f"{name} (fast-scan 4-bit codes, '...x4fs')"
    return name


def gpu_blocker(index: Any) -> str | None:
    """The first part of `index` that Faiss has no GPU version of, described; None when all of it has one."""
    keep: list[Any] = []            # keep wrappers alive while their children are inspected
    stack: list[Any] = [index]
    while stack:
        idx = faiss.downcast_index(stack.pop())
        keep.append(idx)
        if isinstance(idx, (faiss.IndexPreTransform, faiss.IndexIDMap)):
            stack.append(idx.index)
        elif isinstance(idx, faiss.IndexFlat):
            continue
        elif isinstance(idx, faiss.IndexScalarQuantizer) and idx.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
            continue
        elif type(idx).__name__ in GPU_IVF_TYPES:
            quantizer = faiss.downcast_index(idx.quantizer)
            keep.append(quantizer)
            if not isinstance(quantizer, faiss.IndexFlat):
                return f"the IVF coarse quantizer {describe(quantizer)} ('IVFn_HNSWm': use a plain 'IVFn')"
        else:
            return describe(idx)
    return None


def check_gpu_capable(index: Any, factory: str) -> None:
    """Raise a one-line RagError naming the factory and the part without a Faiss GPU version."""
    why = gpu_blocker(index)
    if why is not None:
        raise RagError(f"Faiss index {factory!r} cannot run on a GPU: {why} has no Faiss GPU version; search it "
                       f"on the CPU (without --gpu) or build a GPU-capable index ({GPU_FACTORIES})")


def resolve_devices(devices: Sequence[int] | None, gpu_build: bool, count: int) -> list[int]:
    """The GPU ids to use (None: every visible one); a one-line RagError when there are none to use."""
    if not gpu_build:
        raise RagError(f"--gpu: this faiss has no GPU support (faiss-cpu is installed); {GPU_INSTALL}")
    if count == 0:
        raise RagError("--gpu: faiss-gpu sees no GPU (no CUDA device visible: check the driver and "
                       "CUDA_VISIBLE_DEVICES); search without --gpu")
    if devices is None:
        return list(range(count))
    chosen = list(devices)
    if not chosen or len(set(chosen)) != len(chosen) or any(not 0 <= d < count for d in chosen):
        raise RagError(f"GPU devices {chosen}: expected distinct ids from 0 to {count - 1} ({count} visible)")
    return chosen


def available_gpus(devices: Sequence[int] | None = None) -> list[int]:
    """The GPU ids faiss will use (None: every visible one); a one-line RagError when there are none."""
    return resolve_devices(devices, faiss_gpu_build(), gpu_count())


def device_groups(devices: list[int], shard: bool) -> list[list[int]]:
    """One clone per group: all devices in one sharded clone, else one full replica per device.

    Faiss's own replicas (IndexReplicas) refuse per-call SearchParameters ("search params not supported
    for this index"), so replicas are separate clones and `search_replicas` splits the queries over them.
    """
    return [devices] if shard or len(devices) == 1 else [[d] for d in devices]


def cloner_options(shard: bool, fp16: bool, make: Callable[[], Any] | None = None) -> Any:
    """GpuMultipleClonerOptions: shard splits the vectors over the devices (each holds 1/n); fp16 stores Flat
    vectors and IVF-PQ lookup tables in half precision (IVF-Flat lists stay float32)."""
    options = (make or faiss.GpuMultipleClonerOptions)()
    options.shard = shard
    options.useFloat16 = fp16
    return options


def clone_to_gpus(index: Any, devices: list[int], options: Any) -> tuple[Any, list[Any]]:
    """The GPU clone of `index` over `devices`, and the GPU resources it runs on (they must outlive it)."""
    resources = [faiss.StandardGpuResources() for _ in devices]
    return faiss.index_cpu_to_gpu_multiple_py(resources, index, options, devices), resources


@dataclass
class GpuPlacement:
    """Where an index went: one clone per replica (a single one when sharded or on one device)."""
    replicas: list[Any]
    devices: list[int]
    resources: list[Any] = field(default_factory=list)


def place_on_gpus(index: Any, factory: str, devices: Sequence[int] | None = None, shard: bool = False,
                  fp16: bool = False) -> GpuPlacement:
    """Check, then clone `index` to the GPUs; every refusal is a one-line RagError (Faiss's own reason kept)."""
    chosen = available_gpus(devices)
    check_gpu_capable(index, factory)
    options = cloner_options(shard, fp16)
    placement = GpuPlacement([], chosen)
    for group in device_groups(chosen, shard):
        try:
            clone, resources = clone_to_gpus(index, group, options)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise RagError(f"Faiss index {factory!r} could not be cloned to GPU {group}: {reason}") from exc
        placement.replicas.append(clone)
        placement.resources.extend(resources)
    return placement


def search_replicas(replicas: Sequence[Any], x: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """Split the queries over the replicas and search them in parallel (faiss releases the GIL in search)."""
    parts = [(r, chunk) for r, chunk in zip(replicas, np.array_split(x, len(replicas))) if len(chunk)]
    if len(parts) <= 1:
        return replicas[0].search(x, k, params=params)
    with ThreadPoolExecutor(len(parts)) as pool:
        results = list(pool.map(lambda rc: rc[0].search(np.ascontiguousarray(rc[1]), k, params=params), parts))
    return np.concatenate([d for d, _ in results]), np.concatenate([i for _, i in results])
