"""Per-call search parameters and GPU placement (issue 13).

Search parameters must give exactly what setting nprobe / efSearch / k_factor on the index gave, for every
index family, without changing the index. GPU placement is checked on CPU: which indexes may go, which
devices, which cloner options, and the one-line errors; the clone itself is replaced by a recorder.
"""
from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace
from typing import Any

import faiss
import numpy as np
import pytest

from core.errors import RagError
from index import faiss_gpu
from index.faiss_index import FaissIndex
from index.faiss_params import build_params, read_plan

DIM, N, NQ, K = 32, 2000, 40, 10
FAMILIES = ["Flat", "IVF16,Flat", "IVF16,PQ8", "HNSW16", "IVF16,Flat,RFlat", "OPQ8,IVF16,PQ8", "IVF16,PQ8,RFlat",
            "PCA16,IVF16,Flat", "IVF16_HNSW8,Flat", "IVF16,SQ8", "IVF16,PQ8x4fs"]
SETTINGS = [{}, {"nprobe": 4}, {"ef_search": 8}, {"k_factor": 3}, {"nprobe": 2, "ef_search": 12, "k_factor": 4}]


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return unit(rng.standard_normal((N, DIM))), unit(rng.standard_normal((NQ, DIM)))


@pytest.fixture(scope="module")
def built(data) -> dict[str, FaissIndex]:
    base, _ = data
    out = {}
    for factory in FAMILIES:
        index = FaissIndex.create(DIM, factory)
        index.train(base)
        index.add(base)
        out[factory] = index
    return out


def set_on_index(index: Any, nprobe=None, ef_search=None, k_factor=None) -> Any:
    """The old way, on a copy: write the values into the index itself (what ParameterSpace did)."""
    copy = faiss.clone_index(index)
    idx = faiss.downcast_index(copy)
    if k_factor is not None and isinstance(idx, faiss.IndexRefine):
        idx.k_factor = k_factor
    if nprobe is not None and faiss.try_extract_index_ivf(copy) is not None:
        faiss.extract_index_ivf(copy).nprobe = nprobe
    if ef_search is not None:
        ivf = faiss.try_extract_index_ivf(copy)
        inner = faiss.downcast_index(ivf.quantizer) if ivf is not None else idx
        while not isinstance(inner, faiss.IndexHNSW) and hasattr(inner, "base_index"):
            inner = faiss.downcast_index(inner.base_index)
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = ef_search
    return copy


def ivf_nprobe(index: Any) -> int | None:
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else int(ivf.nprobe)


@pytest.mark.parametrize("factory", FAMILIES)
def test_per_call_params_equal_setting_the_index(built, data, factory):
    index, (_, queries) = built[factory], data
    before = ivf_nprobe(index.index)
    for setting in SETTINGS:
        expected = set_on_index(index.index, **setting).search(queries, K)
        got = index.search(queries, K, **setting)
        assert np.array_equal(got[1], expected[1]), (factory, setting)
        assert np.allclose(got[0], expected[0]), (factory, setting)
    assert ivf_nprobe(index.index) == before, "the index itself is never changed"


def test_old_parameter_space_path_gives_the_same(built, data):
    _, queries = data
    for factory, name, value, kw in (("IVF16,PQ8", "nprobe", 5, {"nprobe": 5}),
                                     ("HNSW16", "efSearch", 9, {"ef_search": 9}),
                                     ("IVF16,Flat,RFlat", "k_factor_rf", 4, {"k_factor": 4})):
        copy = faiss.clone_index(built[factory].index)
        faiss.ParameterSpace().set_index_parameter(copy, name, value)
        assert np.array_equal(copy.search(queries, K)[1], built[factory].search(queries, K, **kw)[1]), factory


@pytest.mark.parametrize("factory,kw", [("Flat", {}), ("IVF16,Flat", {"nprobe": 16}),
                                        ("IVF16,Flat,RFlat", {"nprobe": 16, "k_factor": 2}),
                                        ("IVF16,PQ8,RFlat", {"nprobe": 16, "k_factor": 200})])
def test_exact_settings_equal_brute_force(built, data, factory, kw):
    """Every list probed (and, for refine, enough candidates re-ranked exactly) is exact search."""
    base, queries = data
    truth = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :K]
    assert np.array_equal(built[factory].search(queries, K, **kw)[1], truth)


def test_params_objects_follow_the_wrappers(built):
    plan = read_plan(built["IVF16,PQ8,RFlat"].index)
    assert build_params(plan) is None, "nothing asked: the index's own values, no params object"
    refine = build_params(plan, nprobe=7)
    assert isinstance(refine, faiss.IndexRefineSearchParameters) and refine.k_factor == 1.0
    assert refine.base_index_params is not None    # (SWIG hands it back as the base class)
    assert faiss.downcast_index(built["IVF16,PQ8,RFlat"].index).k_factor == 1.0
    wrapped = build_params(read_plan(built["OPQ8,IVF16,PQ8"].index), nprobe=3)
    assert isinstance(wrapped, faiss.SearchParametersPreTransform)
    quantizer = build_params(read_plan(built["IVF16_HNSW8,Flat"].index), ef_search=20)
    assert quantizer.nprobe == 1 and quantizer.quantizer_params is not None
    assert build_params(read_plan(built["Flat"].index), nprobe=3, ef_search=4, k_factor=2) is None
    assert build_params(read_plan(built["HNSW16"].index), nprobe=3) is None, "nprobe means nothing to HNSW"


# --------------------------------------------------------------------------- GPU: which indexes may go

GPU_OK = ["Flat", "IVF16,Flat", "IVF16,SQ8", "IVF16,PQ8", "OPQ8,IVF16,PQ8", "PCA16,IVF16,Flat", "SQfp16",
          "IDMap,Flat"]
GPU_NOT = [("HNSW16", "IndexHNSWFlat (an HNSW graph)"), ("IVF16,Flat,RFlat", "the refine stage IndexRefineFlat"),
           ("PQ8x4fs", "IndexPQFastScan (fast-scan"), ("IVF16,PQ8x4fs", "IndexIVFPQFastScan (fast-scan"),
           ("IVF16_HNSW8,Flat", "the IVF coarse quantizer IndexHNSWFlat"), ("PQ8", "IndexPQ"),
           ("OPQ8,IVF16,PQ8,RFlat", "the refine stage")]


@pytest.mark.parametrize("factory", GPU_OK)
def test_gpu_capable_indexes(factory):
    assert faiss_gpu.gpu_blocker(faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)) is None


@pytest.mark.parametrize("factory,why", GPU_NOT)
def test_indexes_without_a_gpu_version_are_named(factory, why):
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(RagError) as err:
        faiss_gpu.check_gpu_capable(index, factory)
    message = str(err.value)
    assert "\n" not in message and f"Faiss index {factory!r} cannot run on a GPU: {why}" in message, message
    assert "without --gpu" in message and "IVFn,Flat" in message


def test_device_choice_and_its_errors():
    with pytest.raises(RagError, match=r"faiss-cpu is installed\); pip install -e '\.\[gpu\]'"):
        faiss_gpu.resolve_devices(None, gpu_build=False, count=0)
    with pytest.raises(RagError, match="faiss-gpu sees no GPU"):
        faiss_gpu.resolve_devices(None, gpu_build=True, count=0)
    assert faiss_gpu.resolve_devices(None, True, 3) == [0, 1, 2]
    assert faiss_gpu.resolve_devices([2, 0], True, 3) == [2, 0]
    for bad in ([3], [0, 0], [], [-1]):
        with pytest.raises(RagError, match="expected distinct ids from 0 to 2"):
            faiss_gpu.resolve_devices(bad, True, 3)
    assert faiss_gpu.device_groups([0, 1], shard=False) == [[0], [1]], "replicas: one full clone per GPU"
    assert faiss_gpu.device_groups([0, 1], shard=True) == [[0, 1]]
    assert faiss_gpu.device_groups([1], shard=False) == [[1]]


def test_cloner_options():
    options = faiss_gpu.cloner_options(shard=True, fp16=True, make=SimpleNamespace)
    assert options.shard is True and options.useFloat16 is True
    options = faiss_gpu.cloner_options(shard=False, fp16=False, make=SimpleNamespace)
    assert options.shard is False and options.useFloat16 is False


def test_this_machine_refuses_gpu_in_one_line(built):
    if faiss_gpu.faiss_gpu_build() and faiss_gpu.gpu_count() > 0:
        pytest.skip("faiss sees a GPU here")
    with pytest.raises(RagError) as err:
        built["IVF16,Flat"].to_gpu()
    assert "\n" not in str(err.value) and str(err.value).startswith("--gpu: ")


@pytest.fixture
def fake_gpus(monkeypatch):
    """faiss 'with two GPUs': the clone is a CPU copy, and every clone call is recorded."""
    calls: list[dict[str, Any]] = []

    def clone(index, devices, options):
        calls.append({"devices": list(devices), "shard": options.shard, "fp16": options.useFloat16})
        return faiss.clone_index(index), []

    monkeypatch.setattr(faiss_gpu, "faiss_gpu_build", lambda: True)
    monkeypatch.setattr(faiss_gpu, "gpu_count", lambda: 2)
    monkeypatch.setattr(faiss_gpu, "cloner_options", lambda shard, fp16: SimpleNamespace(shard=shard, useFloat16=fp16))
    monkeypatch.setattr(faiss_gpu, "clone_to_gpus", clone)
    return calls


def test_replicas_split_queries_and_keep_per_call_params(built, data, fake_gpus):
    _, queries = data
    cpu = built["OPQ8,IVF16,PQ8"]
    gpu = cpu.to_gpu()
    assert fake_gpus == [{"devices": [0], "shard": False, "fp16": False},
                         {"devices": [1], "shard": False, "fp16": False}]
    assert gpu.on_gpu and len(gpu.replicas) == 2
    for setting in ({}, {"nprobe": 5}):
        assert np.array_equal(gpu.search(queries, K, **setting)[1], cpu.search(queries, K, **setting)[1])
    assert np.array_equal(gpu.search(queries[:1], K, nprobe=5)[1], cpu.search(queries[:1], K, nprobe=5)[1])


def test_shard_and_fp16_reach_the_cloner(built, fake_gpus):
    built["IVF16,Flat"].to_gpu(devices=[1, 0], shard=True, fp16=True)
    assert fake_gpus == [{"devices": [1, 0], "shard": True, "fp16": True}]


def test_no_clone_is_tried_for_an_index_without_a_gpu_version(built, fake_gpus):
    with pytest.raises(RagError, match="'HNSW16' cannot run on a GPU: IndexHNSWFlat"):
        built["HNSW16"].to_gpu()
    assert fake_gpus == []


def test_a_failed_clone_is_one_line_with_faiss_reason(built, fake_gpus, monkeypatch):
    def refuse(index, devices, options):
        raise RuntimeError("Error in GpuIndexIVFPQ at x.cu:12: Error: 'false' failed:\nbytes per code 96 unsupported")

    monkeypatch.setattr(faiss_gpu, "clone_to_gpus", refuse)
    with pytest.raises(RagError) as err:
        built["IVF16,PQ8"].to_gpu(devices=[0])
    assert str(err.value) == "Faiss index 'IVF16,PQ8' could not be cloned to GPU [0]: bytes per code 96 unsupported"


def test_a_faiss_search_error_is_one_line(built, data):
    with pytest.raises(RagError, match=r"^searching Faiss index 'IVF16,Flat,RFlat' failed: .*k_base >= k"):
        built["IVF16,Flat,RFlat"].search(data[1], K, k_factor=0.5)


# --------------------------------------------------------------------------- install: neither extra

def test_missing_faiss_is_one_line_naming_both_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)          # `import faiss` now raises ImportError
    monkeypatch.delitem(sys.modules, "index.faiss_lib")
    with pytest.raises(RagError) as err:
        importlib.import_module("index.faiss_lib")
    assert isinstance(err.value, ImportError), "probes that catch ImportError keep working"
    message = str(err.value)
    assert "\n" not in message and message.startswith("faiss is not installed")
    assert "'.[cpu]'" in message and "'.[gpu]'" in message
