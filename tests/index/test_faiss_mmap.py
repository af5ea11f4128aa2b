"""Faiss indexes opened memory-mapped: the same results as read into memory, and a cut-short file named in one line."""
from __future__ import annotations

import os

import numpy as np
import pytest

from core.errors import RagError
from index.faiss_index import INDEX_FILE, FaissIndex, mmap_flags
from index.faiss_lib import HAS_MMAP_IN_FILE_CODES
from rag.cli import build_parser
from retrievers.dense import DenseRetriever, open_dense
from retrievers.dense_build import build_dense_index
from tests.index.test_dense_index import fake_encoder

FACTORIES = ["Flat", "SQ8", "PQ4", "IVF4,Flat", "IVF4,PQ4", "HNSW8,Flat", "IVF4,Flat,RFlat"]


def _vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _saved(folder, factory: str, n: int = 600) -> np.ndarray:
    index = FaissIndex.create(16, factory)
    base = _vectors(n)
    if index.needs_training:
        index.train(base)
    index.add(base)
    folder.mkdir(parents=True, exist_ok=True)
    index.save(folder)
    return _vectors(25, seed=1)


@pytest.mark.parametrize("factory", FACTORIES)
def test_mapped_search_equals_in_memory_search(tmp_path, factory):
    queries = _saved(tmp_path, factory)
    in_memory = FaissIndex.load(tmp_path, factory, mmap=False)
    mapped = FaissIndex.load(tmp_path, factory, mmap=True)
    auto = FaissIndex.load(tmp_path, factory, mmap=None)
    assert in_memory.mapped is None and mapped.mapped is not None and auto.mapped is not None
    for kwargs in ({}, {"nprobe": 2}, {"ef_search": 16}, {"k_factor": 3}):
        scores, ids = in_memory.search(queries, 10, **kwargs)
        for other in (mapped, auto):
            mapped_scores, mapped_ids = other.search(queries, 10, **kwargs)
            np.testing.assert_array_equal(mapped_ids, ids)
            np.testing.assert_array_equal(mapped_scores, scores)


def test_which_types_map():
    assert mmap_flags("IVF16,Flat") != 0
    assert mmap_flags("IVF16,PQ4x4fs") == 0 and mmap_flags("PQ4x4fs") == 0
    assert (mmap_flags("Flat") != 0) == HAS_MMAP_IN_FILE_CODES


def test_fast_scan_is_read_by_default_and_refused_when_asked(tmp_path):
    _saved(tmp_path, "PQ4x4fs")
    assert FaissIndex.load(tmp_path, "PQ4x4fs", mmap=None).mapped is None
    with pytest.raises(RagError, match="cannot be memory-mapped") as err:
        FaissIndex.load(tmp_path, "PQ4x4fs", mmap=True)
    assert str(tmp_path / INDEX_FILE) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_truncated_file_is_named_before_searching(tmp_path, factory):
    queries = _saved(tmp_path, factory)
    path = tmp_path / INDEX_FILE
    mapped = FaissIndex.load(tmp_path, factory, mmap=True)
    size = path.stat().st_size
    os.truncate(path, size - 1000)  # cut short under the mapping: the next search must not touch it
    with pytest.raises(RagError, match="changed on disk since it was memory-mapped") as err:
        mapped.search(queries, 5)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RagError, match="truncated or damaged") as err:  # opening a cut-short file
        FaissIndex.load(tmp_path, factory, mmap=True)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def dense(small_corpus, tmp_path):
    out = tmp_path / "dense"
    build_dense_index(small_corpus, out, encoder=fake_encoder())
    return out


def test_dense_retriever_maps_by_default_with_the_same_results(dense):
    mapped = DenseRetriever(dense, encoder=fake_encoder())
    read = open_dense(dense, encoder=fake_encoder(), mmap=False)  # type: ignore[arg-type]  # the option passes
    assert (mapped.index.mapped is not None) == HAS_MMAP_IN_FILE_CODES and read.index.mapped is None
    questions = ["capital of France", "a pet mammal", "programming language"]
    assert mapped.retrieve(questions, k=3) == read.retrieve(questions, k=3)
    assert DenseRetriever(dense, encoder=fake_encoder(), gpu=False, mmap=True).index.mapped is not None


def test_dense_retriever_names_a_truncated_index_file(dense):
    path = dense / INDEX_FILE
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(RagError) as err:
        DenseRetriever(dense, encoder=fake_encoder(), mmap=True)
    assert str(path) in str(err.value) and "truncated" in str(err.value) and "\n" not in str(err.value)


def test_cli_flag(tmp_path):
    argv = ["retrieve", "--index", "i", "--queries", "q", "--out", str(tmp_path / "o")]
    assert build_parser().parse_args(argv).mmap is None
    assert build_parser().parse_args([*argv, "--mmap"]).mmap is True
    assert build_parser().parse_args([*argv, "--no-mmap"]).mmap is False
