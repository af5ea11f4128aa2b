"""BM25 over passages: bm25s (default, pure Python) or Pyserini/Lucene (extra `pyserini`).

Both backends read the same passage table and share the Anserini defaults k1=0.9, b=0.4, so their
rankings can be compared directly. Neither holds a list of every passage: each streams the passage
table. How each builds and searches, and its memory per passage and per term: docs/bm25-at-scale.md.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core.config import opt
from core.corpus import Passage, file_checksum, iter_documents, resolve_corpus_path, split_passages, validate_corpus
from core.errors import InputError, RagError
from core.io import atomic_dir
from index.manifest import MANIFEST, check_files, check_versions, read_manifest, require_keys, write_manifest
from index.passages import PassageStore, write_passage_store
from retrievers.base import Hit, aggregate_passages, check_k
from retrievers.bm25s_stream import Bm25sSearcher, build_bm25s_streamed


@dataclass
class BM25Config:
    backend: str = opt("bm25s", "bm25s | pyserini")
    k1: float = opt(0.9, "BM25 term-frequency saturation", min=0, finite=True)
    b: float = opt(0.4, "BM25 length normalisation", min=0, max=1)
    stemmer: str = opt("english", "PyStemmer language ('' = none)")
    stopwords: str = opt("en", "stopword list ('' = none)")
    words_per_passage: int = opt(100, "words per passage", min=1)
    stride: int = opt(80, "words between passage starts (< words per passage: overlap)", min=1,
                      at_most="words_per_passage")


class BM25Backend(Protocol):
    def build(self, store: PassageStore, folder: Path, config: BM25Config) -> None: ...
    def open(self, folder: Path, config: BM25Config, threads: int | None = None) -> BM25Searcher: ...


class BM25Searcher(Protocol):
    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...


def passage_texts(store: PassageStore) -> Iterator[str]:
    """What BM25 indexes of each passage, "title text", read one line at a time from the store."""
    return (f"{p['title']} {p['text']}" for p in store)


class Bm25sBackend:
    """bm25s with a PyStemmer stemmer and English stop words; vocabulary saved as JSON.

    Built by `retrievers.bm25s_stream.build_bm25s_streamed` from the passage store, a chunk of passages at
    a time (the same files and numbers as `bm25s.BM25(method="lucene").index(...)`), and searched
    memory-mapped, a batch of queries over a thread pool (`Bm25sSearcher`).
    """

    def _tokenizer(self, config: BM25Config):
        import Stemmer
        from bm25s.tokenization import Tokenizer
        stemmer = Stemmer.Stemmer(config.stemmer) if config.stemmer else None
        return Tokenizer(stemmer=stemmer, stopwords=config.stopwords or [])

    def build(self, store: PassageStore, folder: Path, config: BM25Config) -> None:
        build_bm25s_streamed(passage_texts(store), folder / "bm25s", self._tokenizer(config), config.k1, config.b)

    def open(self, folder: Path, config: BM25Config, threads: int | None = None) -> BM25Searcher:
        return Bm25sSearcher(folder / "bm25s", self._tokenizer(config), threads)


_Bm25sSearcher = Bm25sSearcher  # the name before the searcher moved to retrievers/bm25s_stream.py


BM25_BACKENDS: dict[str, BM25Backend] = {"bm25s": Bm25sBackend()}


def _register_optional_backends() -> None:
    from retrievers import pyserini_backend
    BM25_BACKENDS.setdefault("pyserini", pyserini_backend.PyseriniBackend())


def _backend(name: str) -> BM25Backend:
    _register_optional_backends()
    if name not in BM25_BACKENDS:
        raise RagError(f"unknown BM25 backend {name!r}; choose one of {sorted(BM25_BACKENDS)}")
    return BM25_BACKENDS[name]


def _passages(corpus: str | Path, config: BM25Config) -> Iterable[Passage]:
    return split_passages((doc for _, doc in iter_documents(corpus)), config.words_per_passage, config.stride)


def build_bm25_index(corpus: str | Path, out: str | Path, config: BM25Config | None = None,
                     overwrite: bool = False) -> dict[str, Any]:
    """Build a BM25 index folder; nothing appears at `out` unless the build completes."""
    config = config or BM25Config()
    corpus_path = resolve_corpus_path(corpus)
    backend = _backend(config.backend)
    n_docs = validate_corpus(corpus_path)
    start = time.perf_counter()
    with atomic_dir(out, overwrite) as staging:
        counts = write_passage_store(staging, _passages(corpus_path, config))
        with PassageStore(staging) as store:  # each backend streams the passages from the store
            backend.build(store, staging, config)
        seconds = time.perf_counter() - start
        manifest = write_manifest(staging, "bm25", backend=config.backend, config=asdict(config),
                                  corpus_path=str(corpus_path), corpus_checksum=file_checksum(corpus_path),
                                  counts={**counts, "documents": n_docs}, build_seconds=round(seconds, 3))
    return manifest


BM25_KEYS = {"config": dict, "counts.passages": int}


class BM25Retriever:
    """Ranks documents by their best BM25 passage; opening checks the folder is whole (sizes, counts).

    `threads` (default: os.cpu_count()) is how many queries of a batch are searched at once (bm25s: a
    thread pool over the memory-mapped index; pyserini: Lucene's batch_search threads).
    """

    def __init__(self, index_dir: str | Path, threads: int | None = None) -> None:
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(index_dir, "bm25")
        require_keys(index_dir, self.manifest, BM25_KEYS)
        check_files(index_dir, self.manifest)
        check_versions(index_dir, self.manifest)
        known = {f.name for f in fields(BM25Config)}
        unknown = sorted(set(self.manifest["config"]) - known)
        if unknown:
            raise InputError(f"unknown BM25 option(s) {', '.join(map(repr, unknown))}; the manifest is damaged or "
                             "from another toolkit version: rebuild the index", self.index_dir / MANIFEST,
                             field="config")
        self.config = BM25Config(**self.manifest["config"])
        passages = self.manifest["counts"]["passages"]
        self.store = PassageStore(index_dir, expected=passages)
        backend = _backend(self.config.backend)
        try:
            self.searcher = backend.open(self.index_dir, self.config, threads)
        except (OSError, ValueError, KeyError, EOFError) as exc:  # bm25s's files missing, truncated or damaged
            where = where_bm25(self.index_dir, self.config)
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise RagError(f"{where}: cannot load the {self.config.backend} index ({detail}); rebuild the "
                           "index") from None
        n = getattr(self.searcher, "n", None)
        if isinstance(n, int) and n != passages:
            raise RagError(f"{where_bm25(self.index_dir, self.config)}: indexes {n} passages, the manifest counts "
                           f"{passages}: files of another index; rebuild the index")

    def retrieve(self, queries: Sequence[str], k: int = 100, passage_factor: int = 3, **_: Any) -> list[list[Hit]]:
        k = check_k(k)
        check_k(passage_factor, "passage_factor")
        pids, scores = self.searcher.search(queries, k * passage_factor)
        return [aggregate_passages(p, s, self.store, k) for p, s in zip(pids, scores)]


def where_bm25(index_dir: Path, config: BM25Config) -> Path:
    return index_dir / "bm25s" if config.backend == "bm25s" else index_dir


def open_bm25(index_dir: str | Path, threads: int | None = None, **_: Any) -> BM25Retriever:
    return BM25Retriever(index_dir, threads=threads)
