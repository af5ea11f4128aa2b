"""A thin Faiss wrapper: index-factory strings, inner product on normalised vectors, GPUs on request."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import RagError
from index.faiss_gpu import gpu_count, place_on_gpus, search_replicas
from index.faiss_lib import (  # a one-line error when neither the cpu nor the gpu extra is installed
    HAS_MMAP_IN_FILE_CODES,
    HAS_MMAP_IVF,
    faiss,
)
from index.faiss_params import ParamPlan, build_params, read_plan

INDEX_FILE = "index.faiss"


def faiss_has_gpu() -> bool:
    return gpu_count() > 0


def mmap_flags(factory: str) -> int:
    """The faiss.read_index flags that memory-map an index of this factory string; 0 where it cannot be mapped.

    With a faiss that has IO_FLAG_MMAP_IFC (faiss-cpu 1.15 here): every CPU index except fast-scan ones (`...x4fs`, whose codes
    faiss re-packs in memory): Flat, SQ, PQ and refine codes, IVF lists (`IVF...`), HNSW's vector storage (its
    graph is still read into memory). With an older faiss: IVF indexes only (IO_FLAG_MMAP, OnDiskInvertedLists).
    Always read-only (IO_FLAG_READ_ONLY): a mapped index is searched, never added to.
    """
    if "x4fs" in factory.lower():
        return 0
    if HAS_MMAP_IN_FILE_CODES:
        return int(faiss.IO_FLAG_MMAP_IFC) | int(faiss.IO_FLAG_READ_ONLY)
    if HAS_MMAP_IVF and "IVF" in factory.upper():
        return int(faiss.IO_FLAG_MMAP) | int(getattr(faiss, "IO_FLAG_READ_ONLY", 0))
    return 0


class FaissIndex:
    """Wraps any Faiss index built from a factory string (`Flat`, `HNSW32`, `IVF1024,PQ48`, ...).

    On GPUs, `index` is the first clone and `replicas` all of them (one per device unless sharded);
    `plan` is the search-parameter shape read from the CPU index before cloning (index/faiss_params.py).
    """

    def __init__(self, index: Any, factory: str, *, plan: ParamPlan | None = None,
                 replicas: Sequence[Any] = (), on_gpu: bool = False, gpu_resources: Sequence[Any] = ()) -> None:
        self.index = index
        self.factory = factory
        self._plan = plan
        self.replicas = list(replicas) or [index]
        self.on_gpu = on_gpu
        self._gpu_resources = list(gpu_resources)  # the GPU clones use them: keep them alive as long
        self.mapped: tuple[Path, int, int] | None = None  # (file, size, mtime_ns) of a memory-mapped index

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

    def training_minimum(self) -> tuple[int, str]:
        """The fewest training vectors Faiss accepts for this index, and why (0, "" when it needs no training).

        Faiss's rule: every k-means it runs needs at least k points (IVF: nlist; PQ: 2^nbits per
        subquantizer; residual quantizers likewise); a PCA to d dims needs d. Walks wrappers (OPQ/PCA
        pre-transforms, refine, HNSW storage, IDMap) so the check holds for composite factory strings.
        """
        if self.index.is_trained:
            return 0, ""
        needs: list[tuple[int, str]] = []
        keep: list[Any] = []  # keep the wrappers alive while their children are inspected
        stack: list[Any] = [self.index]
        while stack:
            idx: Any = faiss.downcast_index(stack.pop())
            keep.append(idx)
            if isinstance(idx, faiss.IndexPreTransform):
                chain: Any = idx.chain
                for j in range(chain.size()):
                    vt: Any = faiss.downcast_VectorTransform(chain.at(j))
                    keep.append(vt)
                    if isinstance(vt, faiss.OPQMatrix):
                        needs.append((256, "OPQ trains a 256-centroid product quantizer"))
                    elif isinstance(vt, faiss.PCAMatrix):
                        needs.append((int(vt.d_out), f"PCA to {vt.d_out} dimensions"))
            for child in ("index", "base_index", "storage", "quantizer"):
                if hasattr(idx, child) and getattr(idx, child) is not None:
                    stack.append(getattr(idx, child))
            if hasattr(idx, "nlist"):
                needs.append((int(idx.nlist), f"{idx.nlist} IVF lists"))
            if hasattr(idx, "pq"):
                needs.append((int(idx.pq.ksub), f"{idx.pq.ksub} centroids per PQ subquantizer"))
            if hasattr(idx, "rq") or hasattr(idx, "aq"):
                quantizer = idx.rq if hasattr(idx, "rq") else idx.aq
                bits = faiss.vector_to_array(quantizer.nbits)
                if len(bits):
                    needs.append((2 ** int(bits.max()), f"{2 ** int(bits.max())} centroids per residual codebook"))
        return max(needs) if needs else (1, "training")

    def train(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        min_points, why = self.training_minimum()
        if len(vectors) < min_points:
            raise RagError(f"Faiss index {self.factory!r} needs at least {min_points} training vectors ({why}), "
                           f"got {len(vectors)}; use fewer IVF lists / PQ bits, or `Flat` for small corpora")
        try:
            self.index.train(vectors)
        except RuntimeError as exc:
            raise RagError(f"training Faiss index {self.factory!r} on {len(vectors)} vectors failed: "
                           f"{str(exc).splitlines()[-1]}") from None

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

    def plan(self) -> ParamPlan:
        """The search-parameter shape: fixed at cloning for a GPU index, read afresh from a CPU one."""
        return self._plan if self._plan is not None else read_plan(self.index)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None, k_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), best first; ids are -1 where fewer than k exist.

        nprobe (IVF), ef_search (HNSW) and k_factor (refine: re-rank k * k_factor candidates exactly) hold
        for this call only: they travel as SearchParameters, the index itself is never changed. A value an
        index does not use is ignored; None keeps the index's own.
        """
        if self.mapped is not None:
            self._check_mapped_file()
        x = np.ascontiguousarray(queries, dtype=np.float32)
        params = build_params(self.plan(), nprobe, ef_search, k_factor)
        try:
            if len(self.replicas) > 1:
                return search_replicas(self.replicas, x, k, params)
            return self.index.search(x, k, params=params)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise RagError(f"searching Faiss index {self.factory!r} failed: {reason}") from exc

    def to_gpu(self, devices: Sequence[int] | None = None, shard: bool = False, fp16: bool = False) -> FaissIndex:
        """This index cloned to GPUs (None: every visible one), replicated per device or sharded over them.

        A one-line RagError, never a silent CPU fallback: faiss without GPU support, no GPU visible, or an
        index Faiss has no GPU version of (HNSW, refine stages, fast-scan PQ; index/faiss_gpu.py).
        """
        placement = place_on_gpus(self.index, self.factory, devices, shard, fp16)
        return FaissIndex(placement.replicas[0], self.factory, plan=self.plan(), replicas=placement.replicas,
                          on_gpu=True, gpu_resources=placement.resources)

    def save(self, folder: str | Path) -> None:
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        faiss.write_index(index, str(Path(folder) / INDEX_FILE))

    @classmethod
    def load(cls, folder: str | Path, factory: str, mmap: bool | None = False) -> FaissIndex:
        """Read `folder/index.faiss`; a missing, truncated or foreign file is a RagError naming it.

        mmap: True maps the file instead of reading it (see `mmap_flags` for the index types that allow it; a
        RagError for the others); None maps it where the type allows and reads it otherwise; False reads it.
        Searches of a mapped index give exactly the results of one read into memory; the file's size and
        modification time are checked before each search (a file cut short under a mapping would crash the
        process on access).
        """
        path = Path(folder) / INDEX_FILE
        if not path.is_file():
            raise RagError(f"{path}: missing; the index is incomplete: rebuild it")
        flags = mmap_flags(factory) if mmap or mmap is None else 0
        if mmap and not flags:
            raise RagError(f"{path}: a {factory!r} index cannot be memory-mapped by faiss {faiss.__version__} "
                           "(fast-scan codes, or a faiss without IO_FLAG_MMAP_IFC for a non-IVF index); "
                           "open it without mmap (--no-mmap)")
        stat = path.stat()
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise RagError(f"{path}: not a readable Faiss index (truncated or damaged: {reason}); "
                           "rebuild the index") from None
        loaded = cls(index, factory)
        if flags:
            loaded.mapped = (path, stat.st_size, stat.st_mtime_ns)
            loaded._check_mapped_file()  # changed while it was being read
        return loaded

    def _check_mapped_file(self) -> None:
        assert self.mapped is not None
        path, size, mtime = self.mapped
        try:
            stat = path.stat()
        except OSError as exc:
            raise RagError(f"{path}: {exc.strerror} since it was memory-mapped; reopen the index") from None
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
            raise RagError(f"{path}: changed on disk since it was memory-mapped ({size} -> {stat.st_size} bytes, "
                           "or a new modification time): searching it could read garbage or crash; reopen the index "
                           "(rebuild it if it was cut short)")

    def check_shape(self, folder: str | Path, count: int | None = None, dim: int | None = None) -> None:
        """Raise unless the index holds `count` vectors of `dim` dimensions (None: not checked)."""
        path = Path(folder) / INDEX_FILE
        if dim is not None and self.dim != dim:
            raise RagError(f"{path}: holds {self.dim}-dimensional vectors, the manifest says {dim}: "
                           "a file of another index; rebuild the index")
        if count is not None and len(self) != count:
            raise RagError(f"{path}: holds {len(self)} vectors, the manifest counts {count} passages: "
                           "a file of another index, or an incomplete build; rebuild the index")
