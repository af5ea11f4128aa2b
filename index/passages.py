"""On-disk passage table shared by every index: text for results, and passage -> document provenance.

`passages.jsonl` holds one passage a line; `passage_offsets.npy` gives each line's byte offset so a
passage is read with one seek, and `passage_docs.npy` maps a passage to its row in `docs.json`.
Memory stays flat in the corpus size: only the two integer arrays are memory-mapped.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from core.corpus import Passage
from core.errors import RagError
from core.io import atomic_file, read_json, write_json

PASSAGES, OFFSETS, PASSAGE_DOCS, DOCS = "passages.jsonl", "passage_offsets.npy", "passage_docs.npy", "docs.json"


class PassageStoreWriter:
    """Streams passages to disk; call `add` per passage, then `close`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._ctx = atomic_file(self.folder / PASSAGES, "wb")
        self._fh = self._ctx.__enter__()
        self._offsets: list[int] = []
        self._doc_rows: list[int] = []
        self._docs: list[dict] = []
        self._doc_index: dict[str, int] = {}
        self._pos = 0

    def add(self, passage: Passage) -> None:
        row = self._doc_index.get(passage.doc_id)
        if row is None:
            row = self._doc_index[passage.doc_id] = len(self._docs)
            self._docs.append({"id": passage.doc_id, "title": passage.title, "domain": passage.domain})
        line = (json.dumps({"pid": passage.pid, "doc_id": passage.doc_id, "title": passage.title,
                            "text": passage.text, "domain": passage.domain}, ensure_ascii=False) + "\n").encode()
        self._offsets.append(self._pos)
        self._doc_rows.append(row)
        self._fh.write(line)
        self._pos += len(line)

    def close(self) -> dict[str, int]:
        self._ctx.__exit__(None, None, None)
        np.save(self.folder / OFFSETS, np.asarray(self._offsets, dtype=np.int64))
        np.save(self.folder / PASSAGE_DOCS, np.asarray(self._doc_rows, dtype=np.int32))
        write_json(self.folder / DOCS, self._docs)
        return {"passages": len(self._offsets), "documents": len(self._docs)}


def write_passage_store(folder: str | Path, passages: Iterable[Passage]) -> dict[str, int]:
    writer = PassageStoreWriter(folder)
    try:
        for passage in passages:
            writer.add(passage)
    except BaseException:
        writer._ctx.__exit__(Exception, Exception(), None)
        raise
    return writer.close()


class PassageStore:
    """Read side: random access to passages and their documents.

    Opening checks the table is whole (each file present and readable, the arrays of one length, the last
    offset inside passages.jsonl, every document row inside docs.json) and, with `expected`, that it holds
    that many passages; a problem is a RagError naming the file.
    """

    def __init__(self, folder: str | Path, expected: int | None = None) -> None:
        self.folder = Path(folder)
        for name in (PASSAGES, OFFSETS, PASSAGE_DOCS, DOCS):
            if not (self.folder / name).is_file():
                raise RagError(f"{self.folder / name}: missing; the passage table is incomplete: rebuild the index")
        self.offsets = _load_array(self.folder / OFFSETS)
        self.passage_docs = _load_array(self.folder / PASSAGE_DOCS)
        docs = read_json(self.folder / DOCS)
        if not isinstance(docs, list):
            raise RagError(f"{self.folder / DOCS}: expected a JSON list of documents; rebuild the index")
        self.docs: list[dict] = docs
        self._check(expected)
        self._fh = open(self.folder / PASSAGES, "rb")

    def _check(self, expected: int | None) -> None:
        n = len(self.offsets)
        if len(self.passage_docs) != n:
            raise RagError(f"{self.folder / PASSAGE_DOCS}: {len(self.passage_docs)} rows for {n} passage offsets "
                           f"in {OFFSETS}: the table is inconsistent; rebuild the index")
        if expected is not None and n != expected:
            raise RagError(f"{self.folder / OFFSETS}: {n} passages, the manifest counts {expected}: a file of "
                           "another index; rebuild the index")
        size = (self.folder / PASSAGES).stat().st_size
        if n and int(self.offsets[-1]) >= size:
            raise RagError(f"{self.folder / PASSAGES}: {size} bytes, but passage {n - 1} starts at byte "
                           f"{int(self.offsets[-1])}: truncated; rebuild the index")
        if n:
            with open(self.folder / PASSAGES, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    raise RagError(f"{self.folder / PASSAGES}: the last passage is cut off (no final newline): "
                                   "truncated; rebuild the index")
        if n and int(np.max(self.passage_docs)) >= len(self.docs):
            raise RagError(f"{self.folder / DOCS}: {len(self.docs)} documents, but passages refer to row "
                           f"{int(np.max(self.passage_docs))}: truncated or of another index; rebuild the index")

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, pid: int) -> dict:
        self._fh.seek(int(self.offsets[pid]))
        return json.loads(self._fh.readline())

    def doc_of(self, pid: int) -> dict:
        return self.docs[int(self.passage_docs[pid])]

    def __iter__(self) -> Iterator[dict]:
        with open(self.folder / PASSAGES, "rb") as fh:
            for line in fh:
                yield json.loads(line)

    def close(self) -> None:
        self._fh.close()


def _load_array(path: Path) -> np.ndarray:
    """Memory-map a 1-D integer array; a truncated or damaged file is a RagError naming it."""
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise RagError(f"{path}: unreadable ({exc}): truncated or damaged; rebuild the index") from None
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise RagError(f"{path}: holds a {array.dtype} array of shape {array.shape}, expected one integer per "
                       "passage; rebuild the index")
    return array
