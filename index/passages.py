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
    """Read side: random access to passages and their documents."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.offsets = np.load(self.folder / OFFSETS, mmap_mode="r")
        self.passage_docs = np.load(self.folder / PASSAGE_DOCS, mmap_mode="r")
        self.docs: list[dict] = read_json(self.folder / DOCS)
        self._fh = open(self.folder / PASSAGES, "rb")

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
