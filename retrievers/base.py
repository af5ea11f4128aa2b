"""The Retriever protocol, document-level aggregation, and batched retrieval with a progress bar."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from core.errors import RagError


@dataclass(frozen=True)
class Hit:
    """One retrieved document: the best-scoring passage stands for it."""
    doc_id: str
    title: str
    score: float
    text: str = ""
    pid: int = -1
    domain: str | None = None

    def provenance(self) -> dict[str, Any]:
        return {"wikipedia_id": self.doc_id, "title": self.title, "score": self.score, "text": self.text}


@runtime_checkable
class Retriever(Protocol):
    """Anything that maps queries to ranked documents."""

    def retrieve(self, queries: Sequence[str], k: int = 100, **kwargs: Any) -> list[list[Hit]]: ...


def aggregate_passages(pids: np.ndarray, scores: np.ndarray, store, k: int) -> list[Hit]:
    """Turn a ranked passage list into a ranked document list (best passage score per document).

    Documents are told apart by their row in the store's document table (one row per document id), so
    only the kept passages and their documents are read from disk."""
    seen: dict[int, Hit] = {}
    for pid, row, score in zip(pids.tolist(), store.doc_rows(pids).tolist(), scores.tolist()):
        if pid < 0 or row in seen:
            continue  # passages arrive best first, so the first one is the document's best
        doc, passage = store.doc(row), store.get(pid)
        seen[row] = Hit(doc["id"], doc["title"], float(score), passage["text"], pid, doc.get("domain"))
        if len(seen) == k:
            break
    return list(seen.values())


def retrieve_queries(retriever: Any, texts: list[str], k: int, batch_size: int = 64,
                     domains: list[str | None] | None = None) -> list[list[Any]]:
    """Retrieve in batches with a progress bar; known query domains are passed on (MoE routing)."""
    rankings: list[list[Any]] = []
    with_domains = domains is not None and any(d is not None for d in domains)
    for start in tqdm(range(0, len(texts), batch_size), desc="retrieving", unit="batch", dynamic_ncols=True):
        extra = {"domains": domains[start:start + batch_size]} if with_domains else {}
        rankings.extend(retriever.retrieve(texts[start:start + batch_size], k=k, **extra))
    return rankings


def check_k(k: Any, flag: str = "--k") -> int:
    """A ranking depth must be a whole number >= 1 (Faiss asserts on k < 1; BM25 would silently return nothing)."""
    try:
        value = operator.index(k)
    except TypeError:
        raise RagError(f"{flag} must be a whole number of at least 1, got {k!r}") from None
    if isinstance(k, bool) or value < 1:
        raise RagError(f"{flag} must be at least 1, got {k!r}")
    return value
