"""The Retriever protocol, document-level aggregation, and the registry that opens index folders."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from index.manifest import read_manifest
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
    """Turn a ranked passage list into a ranked document list (best passage score per document)."""
    seen: dict[str, Hit] = {}
    for pid, score in zip(pids.tolist(), scores.tolist()):
        if pid < 0:
            continue
        doc = store.doc_of(pid)
        if doc["id"] in seen:
            continue  # passages arrive best first, so the first one is the document's best
        passage = store.get(pid)
        seen[doc["id"]] = Hit(doc["id"], doc["title"], float(score), passage["text"], pid, doc.get("domain"))
        if len(seen) == k:
            break
    return list(seen.values())


Opener = Callable[..., Retriever]
INDEX_KINDS: dict[str, Opener] = {}


def register_index_kind(kind: str) -> Callable[[Opener], Opener]:
    """Register the function that opens an index folder of this manifest kind."""
    def deco(fn: Opener) -> Opener:
        INDEX_KINDS[kind] = fn
        return fn
    return deco


def open_retriever(index_dir: str | Path, **options: Any) -> Retriever:
    """Open any index folder the toolkit built, dispatching on its manifest's `kind`."""
    import importlib

    from retrievers import INDEX_KIND_MODULES
    for module in INDEX_KIND_MODULES:
        importlib.import_module(module)
    manifest = read_manifest(index_dir)
    opener = INDEX_KINDS.get(manifest["kind"])
    if opener is None:
        raise RagError(f"{index_dir}: no retriever for index kind {manifest['kind']!r}; known: {sorted(INDEX_KINDS)}")
    return opener(index_dir, **options)
