"""A thin Faiss wrapper: index-factory strings, inner product on normalised vectors, GPU when present."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from core.errors import RagError

INDEX_FILE = "index.faiss"


def faiss_has_gpu() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


class FaissIndex:
    """Wraps any Faiss index built from a factory string (`Flat`, `HNSW32`, `IVF1024,PQ48`, ...)."""

    def __init__(self, index: faiss.Index, factory: str) -> None:
        self.index = index
        self.factory = factory

    @classmethod
    def create(cls, dim: int, factory: str = "Flat") -> FaissIndex:
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise RagError(f"invalid Faiss factory string {factory!r}: {str(exc).splitlines()[-1]}") from None
        return cls(index, factory)

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def needs_training(self) -> bool:
        return not self.index.is_trained

    def __len__(self) -> int:
        return self.index.ntotal

    def train(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        min_points = getattr(faiss.extract_index_ivf(self.index), "nlist", 1) if "IVF" in self.factory else 1
        if len(vectors) < min_points:
            raise RagError(f"{self.factory} needs at least {min_points} training vectors, got {len(vectors)}; "
                           "use a smaller IVF list count or `Flat` for small corpora")
        self.index.train(vectors)

    def reserve(self, n: int) -> bool:
        """Size a flat-coded index's code buffer for n vectors before adding shard by shard.

        Faiss grows `codes` (a std::vector) geometrically, so old and new buffers coexist at each growth;
        resize then resize(0) keeps the capacity and the adds never reallocate (bench/bench_build_memory.py).
        Returns False for indexes without one flat buffer (IVF, HNSW keep their own structures).
        """
        inner = faiss.downcast_index(self.index)
        if not hasattr(inner, "codes") or inner.ntotal != 0 or not hasattr(inner.codes, "resize"):
            return False
        inner.codes.resize(n * inner.code_size)
        inner.codes.resize(0)
        return True

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None, k_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), best first; ids are -1 where fewer than k exist."""
        params = faiss.ParameterSpace()
        if nprobe is not None and "IVF" in self.factory:
            params.set_index_parameter(self.index, "nprobe", nprobe)
        if ef_search is not None and "HNSW" in self.factory:
            params.set_index_parameter(self.index, "efSearch", ef_search)
        if k_factor is not None and "RFlat" in self.factory:  # re-rank k * k_factor candidates exactly
            params.set_index_parameter(self.index, "k_factor_rf", k_factor)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def to_gpu(self, device: int = 0) -> FaissIndex:
        """Move to a GPU when faiss-gpu is installed; a no-op otherwise."""
        if not faiss_has_gpu():
            return self
        resources = faiss.StandardGpuResources()
        return FaissIndex(faiss.index_cpu_to_gpu(resources, device, self.index), self.factory)

    def save(self, folder: str | Path) -> None:
        index = faiss.index_gpu_to_cpu(self.index) if faiss_has_gpu() and hasattr(self.index, "getDevice") else self.index
        faiss.write_index(index, str(Path(folder) / INDEX_FILE))

    @classmethod
    def load(cls, folder: str | Path, factory: str, mmap: bool = False) -> FaissIndex:
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        return cls(faiss.read_index(str(Path(folder) / INDEX_FILE), flags), factory)
