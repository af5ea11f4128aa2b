"""Retrievers: BM25 (bm25s, pyserini), dense (sentence-transformers + Faiss), generative, hybrid."""
from retrievers.base import Hit, Retriever, aggregate_passages, open_retriever, register_index_kind
from retrievers import bm25 as _bm25  # noqa: F401  (registers "bm25")
from retrievers import dense as _dense  # noqa: F401  (registers "dense")
from retrievers.bm25 import BM25Retriever, build_bm25_index
from retrievers.dense import DenseEncoder, DenseRetriever, build_dense_index

__all__ = ["Hit", "Retriever", "aggregate_passages", "open_retriever", "register_index_kind", "BM25Retriever",
           "build_bm25_index", "DenseEncoder", "DenseRetriever", "build_dense_index"]
