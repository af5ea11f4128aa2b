"""Per-call Faiss search parameters (nprobe, efSearch, k_factor) that reach the right sub-index.

`faiss.ParameterSpace` writes nprobe / efSearch into the index itself: state shared by every caller, and
refused by GPU indexes ("could not set parameter nprobe"). A `faiss.SearchParameters` object travels with
one `search` call instead and works on CPU and GPU alike. Its shape must mirror the index's wrappers
(refine -> pre-transform -> IVF -> coarse quantizer), so the shape is read once from the CPU index as a
`ParamPlan`; a GPU clone keeps the wrappers and turns IVF into GpuIndexIVF, which takes SearchParametersIVF.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from index.faiss_lib import faiss

IVF, HNSW, REFINE, PRETRANSFORM, IDMAP, PLAIN = "ivf", "hnsw", "refine", "pretransform", "idmap", "plain"


@dataclass(frozen=True)
class ParamPlan:
    """Which search parameters an index (and the indexes inside it) takes, with the index's own defaults."""
    kind: str                              # ivf | hnsw | refine | pretransform | idmap | plain
    default: float = 0                     # the index's own nprobe (ivf), efSearch (hnsw) or k_factor (refine)
    child: ParamPlan | None = None         # refine: base index; pretransform/idmap: inner index; ivf: quantizer
    hnsw_flags: tuple[bool, bool] = (True, True)   # hnsw: check_relative_distance, search_bounded_queue


def read_plan(index: Any) -> ParamPlan:
    """The ParamPlan of a CPU index (refine, OPQ/PCA pre-transforms, IDMap, IVF, HNSW; others take none)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        return ParamPlan(REFINE, float(idx.k_factor), read_plan(idx.base_index))
    if isinstance(idx, faiss.IndexPreTransform):
        return ParamPlan(PRETRANSFORM, child=read_plan(idx.index))
    if isinstance(idx, faiss.IndexIDMap):     # IndexIDMap2 too
        return ParamPlan(IDMAP, child=read_plan(idx.index))
    if isinstance(idx, faiss.IndexIVF):
        return ParamPlan(IVF, int(idx.nprobe), read_plan(idx.quantizer))
    if isinstance(idx, faiss.IndexHNSW):
        return ParamPlan(HNSW, int(idx.hnsw.efSearch),
                         hnsw_flags=(bool(idx.hnsw.check_relative_distance), bool(idx.hnsw.search_bounded_queue)))
    return ParamPlan(PLAIN)


def build_params(plan: ParamPlan, nprobe: int | None = None, ef_search: int | None = None,
                 k_factor: float | None = None) -> Any:
    """The SearchParameters for one search (None: the index takes none, or nothing differs from its own).

    A value the caller leaves None is the index's own (read into the plan), as the ParameterSpace path
    left it. efSearch reaches an HNSW index, or the HNSW coarse quantizer of an IVF (`IVFn_HNSWm,...`).
    """
    if nprobe is None and ef_search is None and k_factor is None:
        return None
    if plan.kind == REFINE:
        assert plan.child is not None
        base = build_params(plan.child, nprobe, ef_search)
        return faiss.IndexRefineSearchParameters(k_factor=float(plan.default if k_factor is None else k_factor), base_index_params=base)
    if plan.kind in (PRETRANSFORM, IDMAP):
        assert plan.child is not None
        inner = build_params(plan.child, nprobe, ef_search, k_factor)
        if inner is None or plan.kind == IDMAP:   # IndexIDMap hands params to its index as they are
            return inner
        return faiss.SearchParametersPreTransform(index_params=inner)
    if plan.kind == IVF:
        assert plan.child is not None
        quantizer = build_params(plan.child, ef_search=ef_search) if plan.child.kind == HNSW else None
        if nprobe is None and quantizer is None:
            return None
        return faiss.SearchParametersIVF(nprobe=int(plan.default if nprobe is None else nprobe), quantizer_params=quantizer)
    if plan.kind == HNSW and ef_search is not None:
        relative, bounded = plan.hnsw_flags
        return faiss.SearchParametersHNSW(efSearch=int(ef_search), check_relative_distance=relative,
                                          bounded_queue=bounded)
    return None
