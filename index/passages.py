"""On-disk passage table shared by every index: text for results, and passage -> document provenance.

Files (format 2, manifests from `format_version` 2 on):

* `passages.jsonl`: one passage a line, `{"pid", "doc_id", "title", "text", "domain"}`;
* `passage_offsets.npy` (int64): each passage line's byte offset, so a passage is read with one `pread`;
* `passage_docs.npy` (int32): each passage's row in the document table;
* `docs.jsonl`: the document table, one `{"id", "title", "domain"}` a line, in order of first appearance;
* `doc_offsets.npy` (int64): each document line's byte offset.

Memory stays flat in the corpus size on both sides. The writer streams every file as passages come (the
integer arrays are buffered 64k entries at a time and written into `.npy` files whose header is fixed up
on close); the only thing it keeps per document is the doc id -> row map that lets a document seen again
after others keep its row: 8 bytes per document in one sorted numpy array (a 32-bit hash of the id and
the row; a hash match is confirmed against the id on disk), 16 bytes while a merge copies it: about 47 MB
(94 MB at a merge) for KILT's 5.9M pages. Opening
memory-maps the three arrays and reads a few bytes to check the files agree; nothing is read whole.

Format 1 (toolkits before format 2) kept the document table as one JSON list, `docs.json`; such a store
still opens, but loads that list whole (a warning says so; rebuild the index to have it memory-flat).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, overload

import numpy as np

from core.corpus import Passage
from core.errors import RagError
from core.io import atomic_file, read_json

PASSAGES, OFFSETS, PASSAGE_DOCS = "passages.jsonl", "passage_offsets.npy", "passage_docs.npy"
DOCS, DOC_OFFSETS = "docs.jsonl", "doc_offsets.npy"
LEGACY_DOCS = "docs.json"  # format 1: the whole document table as one JSON list
STORE_FILES = (PASSAGES, OFFSETS, PASSAGE_DOCS, DOCS, DOC_OFFSETS)
CHUNK = 1 << 16  # entries per buffered write of an integer array, and per block of a full scan
DOC_ROWS_BUFFER = 8192  # recent documents kept unsorted by the writer's doc id -> row map before a merge

logger = logging.getLogger(__name__)
_warned: set[str] = set()


class _NpyWriter:
    """A 1-D .npy array written in chunks to an open binary file whose final length is not known up front.

    numpy pads a .npy header so that its shape can grow in place: the header for length 0 is written
    first and rewritten with the real length by `finish`, at the same size.
    """

    def __init__(self, fh: BinaryIO, dtype: type) -> None:
        self.fh, self.dtype = fh, np.dtype(dtype)
        self.header = self._header(0)
        fh.write(self.header)
        self._buf = np.empty(CHUNK, self.dtype)
        self._fill = 0
        self.written = 0  # entries already in the file

    def _header(self, n: int) -> bytes:
        out = io.BytesIO()
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                   "fortran_order": False, "shape": (n,)})
        return out.getvalue()

    def __len__(self) -> int:
        return self.written + self._fill

    def append(self, value: int) -> None:
        self._buf[self._fill] = value
        self._fill += 1
        if self._fill == CHUNK:
            self.flush()

    def flush(self) -> None:
        self.fh.write(self._buf[:self._fill].tobytes())
        self.written += self._fill
        self._fill = 0

    def get(self, i: int) -> int:
        """Entry i, from the buffer or (already written) from the file."""
        if i >= self.written:
            return int(self._buf[i - self.written])
        self.fh.flush()
        size = self.dtype.itemsize
        raw = os.pread(self.fh.fileno(), size, len(self.header) + i * size)
        return int(np.frombuffer(raw, self.dtype)[0])

    def finish(self) -> None:
        self.flush()
        header = self._header(self.written)
        if len(header) != len(self.header):  # numpy leaves room for 21 digits; never expected to happen
            raise RagError(f"cannot fix up the .npy header for {self.written} entries")
        self.fh.seek(0)
        self.fh.write(header)
        self.fh.seek(0, os.SEEK_END)


class _DocRows:
    """doc id -> row of every document written: 8 bytes per document (16 while a merge copies the array).

    Each document is one uint64, a 32-bit blake2b hash of its id in the high half and its row in the low
    half, in a sorted numpy array; the most recent ones wait in a small unsorted buffer and are merged in
    (`np.insert` at their sorted places: linear) when it is full. A hash can stand for more than one id, so
    `candidates` returns every row under it for the caller to confirm against the ids on disk (a false
    candidate costs one read; it comes up for about documents / 2**32 of the lookups).
    """

    def __init__(self, buffer: int | None = None) -> None:
        buffer = buffer or DOC_ROWS_BUFFER
        self._sorted = np.empty(0, np.uint64)
        self._new_keys = np.empty(buffer, np.uint32)
        self._new_rows = np.empty(buffer, np.uint32)
        self._fill = 0

    @staticmethod
    def key(doc_id: str) -> int:
        digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=4).digest()
        return int.from_bytes(digest, "little")

    def candidates(self, key: int) -> list[int]:
        rows: list[int] = []
        if self._fill:
            recent = self._new_keys[:self._fill] == key
            if recent.any():
                rows = self._new_rows[:self._fill][recent].tolist()
        i = int(self._sorted.searchsorted(np.uint64(key << 32)))
        while i < len(self._sorted) and int(self._sorted[i]) >> 32 == key:
            rows.append(int(self._sorted[i]) & 0xFFFFFFFF)
            i += 1
        return rows

    def add(self, key: int, row: int) -> None:
        self._new_keys[self._fill], self._new_rows[self._fill] = key, row
        self._fill += 1
        if self._fill == len(self._new_keys):
            new = np.sort((self._new_keys.astype(np.uint64) << np.uint64(32)) | self._new_rows)
            self._sorted = np.insert(self._sorted, self._sorted.searchsorted(new), new)
            self._fill = 0

    def nbytes(self) -> int:
        return self._sorted.nbytes + self._new_keys.nbytes + self._new_rows.nbytes


class PassageStoreWriter:
    """Streams passages to disk; call `add` per passage, then `close` (or `abort` to leave nothing).

    Passages usually arrive grouped by document; a document seen again after others keeps its first row
    (and its first title and domain).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._files = contextlib.ExitStack()
        try:
            self._passages: BinaryIO = self._open(PASSAGES)
            self._docs: BinaryIO = self._open(DOCS)
            self._offsets = _NpyWriter(self._open(OFFSETS), np.int64)
            self._rows = _NpyWriter(self._open(PASSAGE_DOCS), np.int32)
            self._doc_offsets = _NpyWriter(self._open(DOC_OFFSETS), np.int64)
        except BaseException:
            self.abort()
            raise
        self._doc_rows = _DocRows()
        self._current: tuple[str, int] | None = None  # (doc id, row) of the last passage's document
        self._pos = self._doc_pos = 0
        self._closed = False

    def _open(self, name: str) -> BinaryIO:  # readable too: a repeated document is looked up on disk
        return self._files.enter_context(atomic_file(self.folder / name, "w+b"))

    def _doc_id_at(self, row: int) -> str:
        start = self._doc_offsets.get(row)
        end = self._doc_offsets.get(row + 1) if row + 1 < len(self._doc_offsets) else self._doc_pos
        self._docs.flush()
        return json.loads(os.pread(self._docs.fileno(), end - start, start))["id"]

    def _row(self, passage: Passage) -> int:
        key = _DocRows.key(passage.doc_id)
        for row in self._doc_rows.candidates(key):
            if self._doc_id_at(row) == passage.doc_id:
                return row
        row = len(self._doc_offsets)
        if row > np.iinfo(np.int32).max:
            raise RagError(f"{self.folder / DOCS}: more than {np.iinfo(np.int32).max} documents")
        line = (json.dumps({"id": passage.doc_id, "title": passage.title, "domain": passage.domain},
                           ensure_ascii=False) + "\n").encode()
        self._doc_offsets.append(self._doc_pos)
        self._docs.write(line)
        self._doc_pos += len(line)
        self._doc_rows.add(key, row)
        return row

    def add(self, passage: Passage) -> None:
        if self._current is None or self._current[0] != passage.doc_id:
            self._current = (passage.doc_id, self._row(passage))
        line = (json.dumps({"pid": passage.pid, "doc_id": passage.doc_id, "title": passage.title,
                            "text": passage.text, "domain": passage.domain}, ensure_ascii=False) + "\n").encode()
        self._offsets.append(self._pos)
        self._rows.append(self._current[1])
        self._passages.write(line)
        self._pos += len(line)

    def close(self) -> dict[str, int]:
        """Finish every file (each replaces its final name only now); returns the passage and document counts."""
        counts = {"passages": len(self._offsets), "documents": len(self._doc_offsets)}
        try:
            for array in (self._offsets, self._rows, self._doc_offsets):
                array.finish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._files.close()
        return counts

    def abort(self) -> None:
        """Remove every file written so far (nothing of this writer is left at the final names)."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self._files.__exit__(RagError, RagError("passage table not finished"), None)


def write_passage_store(folder: str | Path, passages: Iterable[Passage]) -> dict[str, int]:
    writer = PassageStoreWriter(folder)
    try:
        for passage in passages:
            writer.add(passage)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class DocTable(Sequence[dict]):
    """The document table as a read-only sequence: `len`, `table[row]` and iteration, without a list in memory."""

    def __init__(self, store: PassageStore) -> None:
        self._store = store

    def __len__(self) -> int:
        return self._store.n_docs

    @overload
    def __getitem__(self, row: int) -> dict: ...
    @overload
    def __getitem__(self, row: slice) -> list[dict]: ...

    def __getitem__(self, row: int | slice) -> dict | list[dict]:
        if isinstance(row, slice):
            return [self._store.doc(i) for i in range(*row.indices(len(self)))]
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"document row {row} out of range ({len(self)} documents)")
        return self._store.doc(row)

    def __iter__(self) -> Iterator[dict]:
        return self._store.iter_docs()


class _IntFile:
    """Entries of a 1-D integer .npy file read by `pread`: nothing is mapped, so any pattern of lookups leaves
    the process's RSS where it was (the pages stay in the kernel's page cache), and threads may share it."""

    _CODES = {("i", 1): "b", ("i", 2): "h", ("i", 4): "i", ("i", 8): "q",
              ("u", 1): "B", ("u", 2): "H", ("u", 4): "I", ("u", 8): "Q"}

    def __init__(self, path: Path, array: np.ndarray) -> None:
        self.path, self.n, self.dtype = path, len(array), array.dtype
        self.itemsize = array.dtype.itemsize
        self.start = int(getattr(array, "offset", 0))  # the .npy header's length
        order = {"<": "<", ">": ">"}.get(array.dtype.str[0], "<")
        code = self._CODES[(array.dtype.kind, self.itemsize)]
        self._one, self._two = struct.Struct(order + code), struct.Struct(order + 2 * code)
        self.fd = os.open(path, os.O_RDONLY)

    def _index(self, i: int, what: str) -> int:
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"{what} {i} out of range ({self.n} in {self.path.name})")
        return i

    def _read(self, count: int, i: int) -> bytes:
        if self.fd < 0:
            raise RagError(f"{self.path}: the passage store is closed")
        size = count * self.itemsize
        raw = os.pread(self.fd, size, self.start + i * self.itemsize)
        if len(raw) != size:
            raise RagError(f"{self.path}: ends inside entry {i}: truncated since it was opened; rebuild the index")
        return raw

    def one(self, i: int, what: str = "entry") -> int:
        return int(self._one.unpack(self._read(1, self._index(i, what)))[0])

    def line_span(self, i: int, size: int, what: str) -> tuple[int, int, int]:
        """(i, start, end) of line i of the JSONL file these are the offsets of; `size` is that file's length."""
        i = self._index(i, what)
        if i == self.n - 1:
            return i, self.one(i), size
        start, end = self._two.unpack(self._read(2, i))
        return i, int(start), int(end)

    def block(self, i: int, count: int) -> np.ndarray:
        return np.frombuffer(self._read(count, i), self.dtype).astype(np.int64)

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close  # raw descriptors are not closed by the garbage collector otherwise


class PassageStore:
    """Read side: random access to passages and their documents.

    Opening checks, reading only a few bytes, that the table is whole: each file present and readable, the
    passage arrays of one length, the first offsets at 0 and the last inside their files, both JSONL files
    ending in a newline, the first and last passages' document rows inside the document table (every row is
    checked when it is used, and all at once by `verify`), and with `expected`, that it holds that many
    passages. A problem is a one-line RagError naming the file.

    `offsets`, `passage_docs` and `doc_offsets` are the arrays memory-mapped (for bulk use; nothing is read
    until used). Lookups (`get`, `doc`, `doc_of`, `doc_rows`) read the few bytes they need with `pread`
    instead, so a long-running retriever does not accumulate mapped pages in its RSS.
    """

    def __init__(self, folder: str | Path, expected: int | None = None) -> None:
        self.folder = Path(folder)
        self.legacy = not (self.folder / DOCS).is_file() and (self.folder / LEGACY_DOCS).is_file()
        doc_files = (LEGACY_DOCS,) if self.legacy else (DOCS, DOC_OFFSETS)
        for name in (PASSAGES, OFFSETS, PASSAGE_DOCS, *doc_files):
            if not (self.folder / name).is_file():
                raise RagError(f"{self.folder / name}: missing; the passage table is incomplete: rebuild the index")
        self.offsets = _load_array(self.folder / OFFSETS)
        self.passage_docs = _load_array(self.folder / PASSAGE_DOCS)
        self._legacy_docs: list[dict] | None = None
        self.doc_offsets: np.ndarray | None = None
        if self.legacy:
            self._legacy_docs = _read_legacy_docs(self.folder / LEGACY_DOCS)
            self.n_docs = len(self._legacy_docs)
        else:
            self.doc_offsets = _load_array(self.folder / DOC_OFFSETS)
            self.n_docs = len(self.doc_offsets)
        self._size = (self.folder / PASSAGES).stat().st_size
        self._docs_size = 0 if self.legacy else (self.folder / DOCS).stat().st_size
        self._fds: list[Any] = []
        try:
            self._offsets = self._keep(_IntFile(self.folder / OFFSETS, self.offsets))
            self._rows = self._keep(_IntFile(self.folder / PASSAGE_DOCS, self.passage_docs))
            self._doc_offsets = (None if self.doc_offsets is None
                                 else self._keep(_IntFile(self.folder / DOC_OFFSETS, self.doc_offsets)))
            self._check(expected)
            self._fd = self._keep(os.open(self.folder / PASSAGES, os.O_RDONLY))
            self._docs_fd = -1 if self.legacy else self._keep(os.open(self.folder / DOCS, os.O_RDONLY))
        except BaseException:
            self.close()
            raise

    def _keep(self, handle: Any) -> Any:
        self._fds.append(handle)
        return handle

    # ------------------------------------------------------------------ checks

    def _check(self, expected: int | None) -> None:
        n = len(self.offsets)
        if len(self.passage_docs) != n:
            raise RagError(f"{self.folder / PASSAGE_DOCS}: {len(self.passage_docs)} rows for {n} passage offsets "
                           f"in {OFFSETS}: the table is inconsistent; rebuild the index")
        if expected is not None and n != expected:
            raise RagError(f"{self.folder / OFFSETS}: {n} passages, the manifest counts {expected}: a file of "
                           "another index; rebuild the index")
        _check_lines(self.folder / PASSAGES, self._offsets, self._size, "passage")
        if self._doc_offsets is not None:
            _check_lines(self.folder / DOCS, self._doc_offsets, self._docs_size, "document")
        if n:
            for pid in (0, n - 1):
                self._row_of(pid)

    def _row_of(self, pid: int) -> int:
        row = self._rows.one(pid, "passage")
        if not 0 <= row < self.n_docs:
            docs = LEGACY_DOCS if self.legacy else DOCS
            raise RagError(f"{self.folder / PASSAGE_DOCS}: passage {pid} refers to document row {row}, but "
                           f"{docs} holds {self.n_docs} documents: truncated or of another index; rebuild the index")
        return row

    def verify(self) -> None:
        """Full check, reading the arrays once in blocks (memory stays flat): offsets strictly increasing
        from 0 and every passage's document row inside the document table. Raises RagError naming the file."""
        for ints, what in ((self._offsets, "passage"), (self._doc_offsets, "document")):
            if ints is None:
                continue
            previous = -1
            for start in range(0, ints.n, CHUNK):
                block = ints.block(start, min(CHUNK, ints.n - start))
                steps = np.diff(block, prepend=previous)
                if int(steps.min()) <= 0:
                    bad = start + int(np.argmax(steps <= 0))
                    raise RagError(f"{ints.path}: {what} {bad} does not start after the one before: damaged; "
                                   "rebuild the index")
                previous = int(block[-1])
        for start in range(0, self._rows.n, CHUNK):
            rows = self._rows.block(start, min(CHUNK, self._rows.n - start))
            outside = np.flatnonzero((rows < 0) | (rows >= self.n_docs))
            if len(outside):
                self._row_of(start + int(outside[0]))

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.offsets)

    def __enter__(self) -> PassageStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def get(self, pid: int) -> dict:
        """Passage `pid` as written: {"pid", "doc_id", "title", "text", "domain"}."""
        return _read_line(self._fd, self._offsets, pid, self._size, "passage")

    @property
    def docs(self) -> DocTable:
        """The document table as a sequence (`len(store.docs)`, `store.docs[row]`, iteration); holds no list."""
        return DocTable(self)

    def doc(self, row: int) -> dict:
        """Document `row` of the table: {"id", "title", "domain"}."""
        if self._legacy_docs is not None:
            return self._legacy_docs[row]
        assert self._doc_offsets is not None
        return _read_line(self._docs_fd, self._doc_offsets, row, self._docs_size, "document")

    def doc_row(self, pid: int) -> int:
        """Row in the document table of passage `pid`'s document (one row per document id)."""
        return self._row_of(pid)

    def doc_rows(self, pids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Document-table rows of many passages; -1 where the passage id is negative (an empty slot)."""
        ids = np.asarray(pids, dtype=np.int64).tolist()
        return np.array([self._row_of(pid) if pid >= 0 else -1 for pid in ids], dtype=np.int64)

    def doc_of(self, pid: int) -> dict:
        return self.doc(self._row_of(pid))

    def iter_docs(self) -> Iterator[dict]:
        if self._legacy_docs is not None:
            yield from self._legacy_docs
            return
        with open(self.folder / DOCS, "rb") as fh:
            for line in fh:
                yield json.loads(line)

    def __iter__(self) -> Iterator[dict]:
        with open(self.folder / PASSAGES, "rb") as fh:
            for line in fh:
                yield json.loads(line)

    def close(self) -> None:
        for handle in getattr(self, "_fds", ()):
            if isinstance(handle, _IntFile):
                handle.close()
            else:
                os.close(handle)
        self._fds = []
        self._fd = self._docs_fd = -1

    __del__ = close  # a retriever dropped without close() must not leak its descriptors


def _read_line(fd: int, offsets: _IntFile, i: int, size: int, what: str) -> dict:
    """Line i of a JSONL file with a byte offset per line, read with one pread (safe across threads)."""
    path = offsets.path.parent / (PASSAGES if what == "passage" else DOCS)
    if fd < 0:
        raise RagError(f"{path}: the passage store is closed")
    i, start, end = offsets.line_span(i, size, what)
    try:
        return json.loads(os.pread(fd, end - start, start))
    except (ValueError, UnicodeDecodeError):
        raise RagError(f"{path}: {what} {i} (bytes {start} to {end}) is not a JSON line: damaged; "
                       "rebuild the index") from None


def _check_lines(path: Path, offsets: _IntFile, size: int, what: str) -> None:
    """The cheap checks of a JSONL file against its offsets: first at 0, last inside, final newline."""
    n = offsets.n
    if not n:
        return
    first, last = offsets.one(0), offsets.one(n - 1)
    if first != 0:
        raise RagError(f"{offsets.path}: the first {what} starts at byte {first}, not 0: damaged; rebuild the index")
    if last >= size:
        raise RagError(f"{path}: {size} bytes, but {what} {n - 1} starts at byte {last}: truncated; "
                       "rebuild the index")
    with open(path, "rb", buffering=0) as fh:
        fh.seek(size - 1)
        if fh.read(1) != b"\n":
            raise RagError(f"{path}: the last {what} is cut off (no final newline): truncated; rebuild the index")


def _read_legacy_docs(path: Path) -> list[dict]:
    key = str(Path(os.path.abspath(path)))
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s: a passage table of format 1 (the document table as one JSON list, %.0f MB, loaded "
                       "whole by every process that opens it); it still works: rebuild the index to have it "
                       "memory-mapped", path, path.stat().st_size / 2**20)
    docs = read_json(path)
    if not isinstance(docs, list):
        raise RagError(f"{path}: expected a JSON list of documents; rebuild the index")
    return docs


def _load_array(path: Path) -> np.ndarray:
    """Memory-map a 1-D integer array; a truncated or damaged file is a RagError naming it."""
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise RagError(f"{path}: unreadable ({exc}): truncated or damaged; rebuild the index") from None
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise RagError(f"{path}: holds a {array.dtype} array of shape {array.shape}, expected one integer per "
                       "row; rebuild the index")
    return array
