"""An existing Lucene index folder (e.g. one of Pyserini's prebuilt KILT indexes) opened as a retriever.

`rag retrieve --index FOLDER` (and `retrievers.open_retriever(FOLDER)`) open a folder that has no
`manifest.json` but holds a Lucene `segments_N` file through `open_lucene`: nothing is written into it.
A hit's document id is its Lucene docid with `docid_suffix`, a regular expression matched at the end of
the docid, removed: `''` keeps docids as they are (KILT's `wikipedia-kilt-doc` uses the Wikipedia id);
`-\\d+` or `#\\d+` turn passage docids such as `290-3` or `290#3` into `290`. Passages are grouped into
documents as for the toolkit's own indexes: the best passage stands for its document, ranked over the
top `k * passage_factor` passages. Title and text come from the stored raw document (its `title`, else
the first line of `contents`), read for the k kept hits only; an index without stored documents gives
empty titles and texts.

Search is `LuceneSearcher.batch_search` with BM25(k1, b) (Anserini's defaults 0.9, 0.4) over `threads`
threads (default os.cpu_count()); the JVM starts and is warmed with one query when the folder opens.
Memory: the JVM's (Lucene reads the index files memory-mapped); nothing per document on the Python side.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import RagError
from retrievers.base import Hit, check_k
from retrievers.pyserini_backend import open_lucene_searcher


def is_lucene_index(folder: str | Path) -> bool:
    """A folder holding a Lucene commit point: a `segments_N` file."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name.startswith("segments_") and p.name != "segments.gen"
                                   for p in folder.iterdir())


def check_lucene_index(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise RagError(f"{folder}: no such folder (a Lucene index folder was expected)")
    if not is_lucene_index(folder):
        raise RagError(f"{folder}: not a Lucene index (no segments_N file)")
    return folder


class LuceneRetriever:
    """Ranks the documents of an existing Lucene index by their best passage (see the module docstring)."""

    def __init__(self, folder: str | Path, docid_suffix: str = "", k1: float = 0.9, b: float = 0.4,
                 threads: int | None = None) -> None:
        self.folder = check_lucene_index(folder)
        try:
            self.suffix = re.compile(f"(?:{docid_suffix})$") if docid_suffix else None
        except re.error as exc:
            raise RagError(f"--docid-suffix {docid_suffix!r}: not a regular expression ({exc})") from None
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.searcher = open_lucene_searcher(self.folder, k1, b)

    def doc_id(self, docid: str) -> str:
        return self.suffix.sub("", docid) if self.suffix is not None else docid

    def _stored(self, docid: str) -> tuple[str, str]:
        doc = self.searcher.doc(docid)
        raw = (doc.raw() if doc is not None else None) or ""
        try:
            fields = json.loads(raw)
        except ValueError:
            fields = {"contents": raw}
        if not isinstance(fields, dict):
            fields = {}
        text = str(fields.get("contents") or fields.get("text") or "")
        title = str(fields.get("title") or text.split("\n", 1)[0][:200])
        return title, text

    def retrieve(self, queries: Sequence[str], k: int = 100, passage_factor: int = 3, **_: Any) -> list[list[Hit]]:
        k = check_k(k)
        check_k(passage_factor, "passage_factor")
        qids = [str(i) for i in range(len(queries))]
        results = self.searcher.batch_search(list(queries), qids, k=k * passage_factor, threads=self.threads)
        rankings = []
        for qid in qids:
            seen: dict[str, Hit] = {}
            for h in results.get(qid, []):
                doc_id = self.doc_id(h.docid)
                if doc_id in seen:
                    continue
                title, text = self._stored(h.docid)
                seen[doc_id] = Hit(doc_id, title, float(h.score), text)
                if len(seen) == k:
                    break
            rankings.append(list(seen.values()))
        return rankings


def open_lucene(index_dir: str | Path, docid_suffix: str | None = None, threads: int | None = None,
                k1: float = 0.9, b: float = 0.4, **_: Any) -> LuceneRetriever:
    return LuceneRetriever(index_dir, docid_suffix or "", k1=k1, b=b, threads=threads)
