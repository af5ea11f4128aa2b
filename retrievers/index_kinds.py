"""The one registry of index kinds: how each is configured, built and opened.

Adding an index kind = one module with a config dataclass, a `build(corpus, out, config, overwrite=...,
**runtime) -> manifest` and an `open(index_dir, **options) -> Retriever`, plus one line in INDEX_KINDS.
Entries name their functions as "module:attribute" so the CLI starts without importing torch or faiss.
The CLI (`rag index build`), the corpus-swap harness and the demo all build through `build_index`,
and every consumer opens folders through `open_retriever` (dispatch on the manifest's `kind`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import build_config
from core.errors import RagError
from index.manifest import MANIFEST, read_manifest
from retrievers.base import Retriever


@dataclass(frozen=True)
class IndexKind:
    help: str
    config: str          # "module:ConfigClass"
    build: str           # "module:function"
    open: str            # "module:function"


INDEX_KINDS: dict[str, IndexKind] = {
    "bm25": IndexKind("sparse BM25 over passages (bm25s, or Pyserini/Lucene with --backend pyserini)",
                      "retrievers.bm25:BM25Config", "retrievers.bm25:build_bm25_index", "retrievers.bm25:open_bm25"),
    "dense": IndexKind("dense bi-encoder passages in a Faiss index (--encoder, --faiss)",
                       "retrievers.dense_build:DenseBuildConfig", "retrievers.dense_build:build_dense_index",
                       "retrievers.dense:open_dense"),
    "trie": IndexKind("title trie for generative retrieval over a model's tokenizer (--model)",
                      "retrievers.generative.index:TrieBuildConfig", "retrievers.generative.index:build_trie_index",
                      "retrievers.generative.retriever:open_generative"),
}


# Index folders built by other tools, opened in place (no manifest; nothing is written into them): name ->
# ("module:is_folder_of_this_kind", "module:open"). A Lucene folder: retrievers/lucene_index.py.
FOREIGN_INDEXES: dict[str, tuple[str, str]] = {
    "lucene": ("retrievers.lucene_index:is_lucene_index", "retrievers.lucene_index:open_lucene"),
}


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def index_kind(kind: str) -> IndexKind:
    try:
        return INDEX_KINDS[kind]
    except KeyError:
        raise RagError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}") from None


def config_class(kind: str) -> type:
    return _load(index_kind(kind).config)


def index_config(kind: str, *layers: dict[str, Any] | None) -> Any:
    """The kind's config from layers of options (later layers win; None values are skipped)."""
    return build_config(config_class(kind), *layers)


def build_index(kind: str, corpus: str | Path, out: str | Path, config: Any = None, *, overwrite: bool = False,
                **runtime: Any) -> dict[str, Any]:
    """Build an index of `kind` at `out`; `runtime` holds non-config arguments (e.g. a Ray encode function)."""
    return _load(index_kind(kind).build)(corpus, out, config, overwrite=overwrite, **runtime)


def open_retriever(index_dir: str | Path, **options: Any) -> Retriever:
    """Open any index folder the toolkit built, dispatching on its manifest's `kind`, or a folder of
    FOREIGN_INDEXES (an existing Lucene index: options `docid_suffix`, `threads`, `k1`, `b`)."""
    if not (Path(index_dir) / MANIFEST).exists():
        for is_kind, open_kind in FOREIGN_INDEXES.values():
            if _load(is_kind)(index_dir):
                return _load(open_kind)(index_dir, **options)
        if Path(index_dir).is_dir():
            raise RagError(f"{index_dir}: neither an index folder of rag (no {MANIFEST}: an interrupted build?) "
                           "nor a Lucene index (no segments_N file)")
    manifest = read_manifest(index_dir)
    kind = manifest["kind"]
    if kind not in INDEX_KINDS:
        raise RagError(f"{index_dir}: no retriever for index kind {kind!r}; known: {', '.join(INDEX_KINDS)}")
    return _load(INDEX_KINDS[kind].open)(index_dir, **options)
