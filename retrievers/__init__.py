"""Retrievers: BM25 (bm25s, pyserini), dense (sentence-transformers + Faiss), generative, hybrid.

Attributes load lazily so that `index/` modules can import `retrievers.encoders` without pulling
in every retriever (and so the CLI starts fast).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Hit": "retrievers.base", "Retriever": "retrievers.base", "aggregate_passages": "retrievers.base",
    "open_retriever": "retrievers.index_kinds", "build_index": "retrievers.index_kinds",
    "INDEX_KINDS": "retrievers.index_kinds",
    "retrieve_queries": "retrievers.base",
    "BM25Retriever": "retrievers.bm25", "build_bm25_index": "retrievers.bm25",
    "DenseEncoder": "retrievers.encoders", "load_encoder": "retrievers.encoders",
    "DenseRetriever": "retrievers.dense", "build_dense_index": "retrievers.dense",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'retrievers' has no attribute {name!r}")
