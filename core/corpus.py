"""Corpus loading in the formats people already have, strict validation, and passage splitting.

Reads the toolkit's own JSONL (`id`, `title`, `text`, optional `domain`, `anchors`), Pyserini
(`id`, `contents`), BEIR (`_id`, `title`, `text`) and the KILT knowledge source (`wikipedia_id`,
`wikipedia_title`, `text` as a list of paragraphs). Every error names the file, line and field.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from core.errors import InputError


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    domain: str | None = None
    anchors: tuple[dict[str, Any], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.id, "title": self.title, "text": self.text}
        if self.domain is not None:
            row["domain"] = self.domain
        if self.anchors:
            row["anchors"] = list(self.anchors)
        row.update(self.extra)
        return row


@dataclass(frozen=True)
class Passage:
    """A retrievable unit; `doc_id` maps it back to its document (provenance)."""
    pid: int
    doc_id: str
    title: str
    text: str
    domain: str | None = None

    @property
    def encode_text(self) -> str:
        return f"{self.title}: {self.text}" if self.title else self.text


ID_KEYS = ("id", "_id", "wikipedia_id")


def clean_id(value: Any, path: str | Path | None = None, line: int | None = None, field: str = "id") -> str:
    """An id as the toolkit compares it: a string or an integer, stripped; refused (InputError naming file,
    line and field) when it is null, a float (1.0 and 1 would silently be two ids), a bool, an object, empty,
    or holds a control character (a NUL byte, a newline) or a lone surrogate."""
    if value is None:
        raise InputError("missing (null)", path, line, field)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        kind = {float: "a number with a fraction or exponent", dict: "an object", list: "a list"}.get(
            type(value), type(value).__name__)
        raise InputError(f"an id must be a string or an integer, got {kind} ({json.dumps(value, default=repr)[:40]})",
                         path, line, field)
    text = str(value).strip()
    if not text:
        raise InputError("empty", path, line, field)
    bad = next((ch for ch in text if unicodedata.category(ch) in ("Cc", "Cs")), None)
    if bad is not None:
        what = "a lone surrogate" if unicodedata.category(bad) == "Cs" else "a control character"
        raise InputError(f"holds {what} (U+{ord(bad):04X}); ids must be printable text", path, line, field)
    return text


def check_unicode(obj: Any, path: str | Path | None, line: int | None, field: str | None = None) -> None:
    """Refuse text that cannot be written back as UTF-8: a lone surrogate (JSON allows the escape "\\ud800",
    Python reads it, and every writer fails on it later). Names the field (`anchors[2].text`)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    if isinstance(obj, str):
        at = next(i for i, ch in enumerate(obj) if 0xD800 <= ord(ch) <= 0xDFFF)
        raise InputError(f"invalid Unicode: a lone surrogate (U+{ord(obj[at]):04X}) at character {at}",
                         path, line, field)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        name = (f"{field}.{key}" if field else str(key)) if isinstance(obj, dict) else f"{field}[{key}]"
        if isinstance(obj, dict) and isinstance(key, str):
            check_unicode(key, path, line, name)
        check_unicode(value, path, line, name)


def _require_str(obj: dict, key: str, path: Path, line: int, allow_empty: bool = False) -> str:
    if key not in obj or obj[key] is None:
        raise InputError("missing", path, line, key)
    value = obj[key]
    if key in ID_KEYS:
        return clean_id(value, path, line, key)
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {type(value).__name__}", path, line, key)
    if not allow_empty and not value.strip():
        raise InputError("empty", path, line, key)
    return value


ANCHOR_TEXT_KEYS = ("text", "title", "wikipedia_title", "href")
ANCHOR_INT_KEYS = ("paragraph", "paragraph_id", "start", "end")


def _anchors(obj: dict[str, Any], path: Path, line: int) -> tuple[dict[str, Any], ...]:
    """`anchors`: a list of objects whose text fields are strings and positions non-negative integers."""
    anchors = obj.get("anchors") or ()
    if not isinstance(anchors, (list, tuple)):
        raise InputError(f"expected a list, got {type(anchors).__name__}", path, line, "anchors")
    for i, anchor in enumerate(anchors):
        where = f"anchors[{i}]"
        if not isinstance(anchor, dict):
            raise InputError(f"expected an object ({{text, title, paragraph, start, end}}), got "
                             f"{type(anchor).__name__}", path, line, where)
        for key in ANCHOR_TEXT_KEYS:
            if anchor.get(key) is not None and not isinstance(anchor[key], str):
                raise InputError(f"expected a string, got {type(anchor[key]).__name__}", path, line, f"{where}.{key}")
        for key in ANCHOR_INT_KEYS:
            value = anchor.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InputError(f"expected a non-negative integer, got {json.dumps(value, default=repr)[:40]}", path, line,
                                 f"{where}.{key}")
        if "wikipedia_id" in anchor and anchor["wikipedia_id"] is not None:
            clean_id(anchor["wikipedia_id"], path, line, f"{where}.wikipedia_id")
    return tuple(anchors)


def _parse_row(obj: dict[str, Any], path: Path, line: int) -> Document:
    """Detect the row's format by its keys and turn it into a Document."""
    check_unicode(obj, path, line)
    if "wikipedia_id" in obj:  # KILT knowledge source
        doc_id = _require_str(obj, "wikipedia_id", path, line)
        title = _require_str(obj, "wikipedia_title", path, line)
        paragraphs = obj.get("text")
        if not isinstance(paragraphs, list) or not paragraphs:
            raise InputError("expected a non-empty list of paragraphs", path, line, "text")
        # KILT repeats the title as paragraph 0; drop it so it is not indexed twice.
        body = [p.strip() for p in paragraphs if isinstance(p, str) and p.strip()]
        if body and body[0] == title.strip():
            body = body[1:]
        if not body:
            raise InputError("empty", path, line, "text")
        return Document(doc_id, title, "\n\n".join(body), anchors=_anchors(obj, path, line))
    if "contents" in obj and "text" not in obj:  # Pyserini
        doc_id = _require_str(obj, "id", path, line)
        contents = _require_str(obj, "contents", path, line)
        first, _, rest = contents.partition("\n")
        title, text = (first.strip(), rest.strip()) if rest.strip() else (doc_id, contents)
        return Document(doc_id, title, text)
    id_key = "_id" if "_id" in obj and "id" not in obj else "id"  # BEIR uses _id
    doc_id = _require_str(obj, id_key, path, line)
    # BEIR corpora leave many titles empty ("title": ""): accepted there; the toolkit's own rows need one.
    title = _require_str(obj, "title", path, line, allow_empty=id_key == "_id")
    text = _require_str(obj, "text", path, line)
    domain = obj.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise InputError("expected a string", path, line, "domain")
    anchors = _anchors(obj, path, line)
    known = {"id", "_id", "title", "text", "domain", "anchors"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return Document(doc_id, title, text, domain, anchors, extra)


def file_checksum(path: str | Path, algo: str = "sha256") -> str:
    digest = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return f"{algo}:{digest.hexdigest()}"


def resolve_corpus_path(path: str | Path) -> Path:
    """Accept a corpus file or a folder holding corpus.jsonl (what `rag data prepare` writes)."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.exists():
        raise InputError("corpus file not found", path)
    return path


def _decode_line(raw: bytes, path: Path, lineno: int) -> dict[str, Any] | None:
    """One JSONL line as an object (None for a blank line); the errors of `core.io.iter_jsonl`, word for word."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"invalid UTF-8 at byte {exc.start}", path, lineno) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise InputError("JSON nested too deeply", path, lineno) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON ({exc.msg} at column {exc.colno})", path, lineno) from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", path, lineno)
    return obj


def _scan(path: Path, digest: Any = None) -> Iterator[tuple[int, int, int, Document]]:
    """(line number, byte offsets where the line starts and ends, Document) for each non-blank line;
    `digest` sees every byte read."""
    with open(path, "rb") as fh:
        offset = 0
        for lineno, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            if digest is not None:
                digest.update(raw)
            obj = _decode_line(raw, path, lineno)
            if obj is not None:
                yield lineno, start, offset, _parse_row(obj, path, lineno)


def iter_documents(path: str | Path) -> Iterator[tuple[int, Document]]:
    path = resolve_corpus_path(path)
    for line, _, _, doc in _scan(path):
        yield line, doc


# --------------------------------------------------------------------------- memory-flat id bookkeeping

CHUNK = 1 << 16      # entries per block of the growing integer arrays
DOC_CACHE = 256      # parsed documents a disk-backed corpus keeps (least recently used dropped first)
_ROW_MASK = (1 << 32) - 1


def id_hash(doc_id: str, nbytes: int = 8) -> int:
    """A blake2b hash of an id as an unsigned integer of `nbytes` bytes (8: duplicate checks; 4: id -> row keys)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=nbytes).digest()
    return int.from_bytes(digest, "little")


class _Growing:
    """A 1-D integer array appended one entry at a time, kept in blocks of CHUNK (no list of Python ints)."""

    def __init__(self, dtype: type) -> None:
        self.dtype = np.dtype(dtype)
        self._blocks: list[np.ndarray] = []
        self._buf = np.empty(CHUNK, self.dtype)
        self._fill = 0

    def __len__(self) -> int:
        return len(self._blocks) * CHUNK + self._fill

    def append(self, value: int) -> None:
        self._buf[self._fill] = value
        self._fill += 1
        if self._fill == CHUNK:
            self._blocks.append(self._buf)
            self._buf = np.empty(CHUNK, self.dtype)
            self._fill = 0

    def array(self) -> np.ndarray:
        """Every entry as one array; each block is released as soon as it is copied, so the peak is the array
        and one block, not twice the array (the builder is empty after this)."""
        out = np.empty(len(self), self.dtype)
        blocks, self._blocks = self._blocks, []
        blocks.reverse()
        at = 0
        while blocks:
            block = blocks.pop()
            out[at:at + len(block)] = block
            at += len(block)
            del block
        out[at:] = self._buf[:self._fill]
        self._buf, self._fill = np.empty(0, self.dtype), 0
        return out


def _duplicate_error(path: Path, doc_id: str, first: int, second: int) -> InputError:
    return InputError(f"duplicate id {doc_id!r} (first seen on line {first})", path, second, "id")


def _first_duplicate_by_rescan(path: Path, hashes: np.ndarray, before: int | None) -> InputError | None:
    """The error a dict of every id would have raised first, from the 64-bit id hashes of the rows (sorted here, in
    place): only ids whose hash occurs twice are looked at again, by reading the file up to line `before`."""
    hashes.sort()
    repeated = hashes[1:][hashes[1:] == hashes[:-1]]
    if not len(repeated):
        return None
    suspects = {int(h) for h in np.unique(repeated)}
    first: dict[str, int] = {}
    for line, _, _, doc in _scan(path):
        if before is not None and line >= before:
            break
        if id_hash(doc.id) in suspects:
            if doc.id in first:
                return _duplicate_error(path, doc.id, first[doc.id], line)
            first[doc.id] = line
    return None  # distinct ids that share a hash


class DocumentFile(Sequence[Document]):
    """The documents of a corpus file as a read-only sequence, read from disk on demand (what `Corpus.load` holds).

    Per document it keeps 12 bytes (16 for a file of 4 GB or more) in two numpy arrays: the byte offset of its
    line (uint32, or int64 from 4 GB on), and a sorted
    uint64 key, a 32-bit blake2b hash of the id in the high half and the row in the low half, for `row_of`
    (a hash match is confirmed against the id on disk). `table[i]` reads and parses line i with one `pread`
    (the last DOC_CACHE documents parsed are kept); slicing gives a list; iteration streams the file.

    The file's size and modification time are recorded when it is loaded: reading a document from a file that
    changed since is a one-line InputError naming it (the offsets would point into other bytes).
    """

    def __init__(self, path: Path, offsets: np.ndarray, keys: np.ndarray, end: int, stat: os.stat_result) -> None:
        self.path = path
        self.offsets = offsets  # byte offset of each document's line
        self._keys = keys       # sorted (hash32 << 32) | row
        self._end = end         # end of the last document's line
        self._stamp = (stat.st_size, stat.st_mtime_ns)
        self._fd = -1
        self._cache: OrderedDict[int, Document] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> tuple[DocumentFile, str]:
        """Read and validate the file once (bad rows, duplicate ids, an empty corpus raise InputError, as a
        pass remembering every id would, first error first); returns the table and the file's sha256 checksum."""
        before = os.stat(path)
        digest = hashlib.sha256()
        offsets = _Growing(np.uint32 if before.st_size < 2**32 else np.int64)  # 4 bytes a document below 4 GB
        keys = _Growing(np.uint64)
        end = 0
        try:
            for _, start, end, doc in _scan(path, digest):
                row = len(offsets)
                if row > _ROW_MASK:
                    raise InputError(f"more than {_ROW_MASK + 1} documents", path)
                offsets.append(start)
                keys.append((id_hash(doc.id, 4) << 32) | row)
        except InputError:  # a duplicate on an earlier line is the first error of the file
            partial = cls(path, offsets.array(), np.sort(keys.array()), end, before)
            duplicate = partial._first_duplicate()
            if duplicate is not None:
                raise duplicate from None
            raise
        if not len(offsets):
            raise InputError("corpus is empty", path)
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise InputError("the file changed while it was being read; load it again", path)
        key_array = keys.array()
        key_array.sort()
        table = cls(path, offsets.array(), key_array, end, after)
        duplicate = table._first_duplicate()
        if duplicate is not None:
            raise duplicate
        return table, f"sha256:{digest.hexdigest()}"

    # ------------------------------------------------------------------ reading

    def _check_unchanged(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise InputError(f"the corpus file is gone since it was loaded ({exc.strerror}); load it again",
                             self.path) from None
        if (stat.st_size, stat.st_mtime_ns) != self._stamp:
            raise InputError(f"the file changed on disk since it was loaded (size {self._stamp[0]} -> "
                             f"{stat.st_size} bytes, or a new modification time); load the corpus again", self.path)

    def _read(self, row: int) -> Document:
        start = int(self.offsets[row])
        end = int(self.offsets[row + 1]) if row + 1 < len(self.offsets) else self._end
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, end - start, start)
        try:
            obj = _decode_line(raw, self.path, 0) if len(raw) == end - start else None
            if obj is None:
                raise InputError("blank or cut off")
            return _parse_row(obj, self.path, 0)
        except InputError:
            raise InputError(f"document {row} (bytes {start} to {end}) no longer parses: the file changed since "
                             "it was loaded; load the corpus again", self.path) from None

    def _doc(self, row: int) -> Document:
        with self._lock:
            doc = self._cache.get(row)
            if doc is not None:
                self._cache.move_to_end(row)
                return doc
            self._check_unchanged()
            doc = self._read(row)
            self._cache[row] = doc
            if len(self._cache) > DOC_CACHE:
                self._cache.popitem(last=False)
            return doc

    def __len__(self) -> int:
        return len(self.offsets)

    @overload
    def __getitem__(self, i: int) -> Document: ...
    @overload
    def __getitem__(self, i: slice) -> list[Document]: ...

    def __getitem__(self, i: int | slice) -> Document | list[Document]:
        if isinstance(i, slice):
            return [self._doc(row) for row in range(*i.indices(len(self)))]
        row = operator.index(i)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"document {i} out of range ({len(self)} documents)")
        return self._doc(row)

    def __iter__(self) -> Iterator[Document]:
        self._check_unchanged()
        for _, _, _, doc in _scan(self.path):
            yield doc

    def row_of(self, doc_id: str) -> int | None:
        """The row of the document with this id, or None."""
        key = id_hash(doc_id, 4)
        i = int(self._keys.searchsorted(np.uint64(key << 32)))
        while i < len(self._keys) and int(self._keys[i]) >> 32 == key:
            row = int(self._keys[i]) & _ROW_MASK
            if self._doc(row).id == doc_id:
                return row
            i += 1
        return None

    def nbytes(self) -> int:
        return self.offsets.nbytes + self._keys.nbytes

    # ------------------------------------------------------------------ load-time checks

    def _first_duplicate(self) -> InputError | None:
        """The first duplicate id in file order (the second occurrence with the lowest line), or None: rows
        whose 32-bit hashes are equal are read back and their ids compared."""
        keys, n = self._keys, len(self._keys)
        suspects: set[int] = set()
        for s in range(0, max(n - 1, 0), CHUNK):
            block = keys[s:s + CHUNK + 1] >> np.uint64(32)
            for j in np.flatnonzero(block[1:] == block[:-1]).tolist():
                suspects.update((int(keys[s + j]) & _ROW_MASK, int(keys[s + j + 1]) & _ROW_MASK))
        rows_by_id: dict[str, list[int]] = {}
        for row in sorted(suspects):
            rows_by_id.setdefault(self._read(row).id, []).append(row)
        repeats = [(rows[1], rows[0], doc_id) for doc_id, rows in rows_by_id.items() if len(rows) > 1]
        if not repeats:
            return None
        second, first, doc_id = min(repeats)
        first_line, second_line = _line_numbers(self.path, [int(self.offsets[first]), int(self.offsets[second])])
        return _duplicate_error(self.path, doc_id, first_line, second_line)

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    __del__ = close

    def __getstate__(self) -> dict[str, Any]:  # picklable (Ray workers): no descriptor, lock or cache
        state = dict(self.__dict__)
        state.update(_fd=-1, _cache=OrderedDict(), _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _line_numbers(path: Path, offsets: list[int]) -> list[int]:
    """The 1-based line number of each byte offset (offsets ascending), counting newlines in 1 MB blocks."""
    lines, newlines, pos = [], 0, 0
    with open(path, "rb") as fh:
        for offset in offsets:
            while pos < offset:
                block = fh.read(min(1 << 20, offset - pos))
                if not block:
                    break
                newlines += block.count(b"\n")
                pos += len(block)
            lines.append(newlines + 1)
    return lines


class Corpus:
    """A corpus with id lookup: in memory (`Corpus(documents)`) or backed by its file (`Corpus.load`).

    `Corpus.load` keeps 12 bytes per document (16 from a 4 GB file on; a `DocumentFile`), whatever the documents' size: `documents[i]`
    and `get` read one line from disk, iteration streams the file. `by_title()` and `passages()` build whole-corpus
    structures (every document, every passage) by design: use them on corpora that fit in memory, and
    `iter_documents` / `split_passages(corpus)` to stream very large ones.
    """

    def __init__(self, documents: Sequence[Document], path: Path | None = None, checksum: str | None = None) -> None:
        self.documents: Sequence[Document] = documents
        self.path = path
        self.checksum = checksum
        self._by_id: dict[str, int] | None = (None if isinstance(documents, DocumentFile)
                                               else {d.id: i for i, d in enumerate(documents)})

    @classmethod
    def load(cls, path: str | Path) -> Corpus:
        """Load and validate: bad rows, duplicate ids and an empty corpus raise InputError. Disk-backed: the
        documents stay in the file (see `DocumentFile`); one pass reads it, the checksum computed on the way."""
        path = resolve_corpus_path(path)
        table, checksum = DocumentFile.load(path)
        return cls(table, path, checksum)

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)

    def _row(self, doc_id: str) -> int | None:
        if self._by_id is not None:
            return self._by_id.get(doc_id)
        assert isinstance(self.documents, DocumentFile)
        return self.documents.row_of(doc_id) if isinstance(doc_id, str) else None

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self._row(doc_id) is not None

    def get(self, doc_id: str) -> Document:
        """The document with this id; KeyError if there is none."""
        row = self._row(doc_id)
        if row is None:
            raise KeyError(doc_id)
        return self.documents[row]

    def by_title(self) -> dict[str, Document]:
        """title -> document (the last of a repeated title). Holds every document in memory: O(corpus size)."""
        return {d.title: d for d in self.documents}

    def passages(self, words_per_passage: int = 100, stride: int = 80) -> list[Passage]:
        """Every passage as a list: O(corpus size) in memory; `split_passages(corpus, ...)` streams them."""
        return list(split_passages(self.documents, words_per_passage, stride))


def split_passages(documents, words_per_passage: int = 100, stride: int = 80) -> Iterator[Passage]:
    """Split documents into windows of `words_per_passage` words, advancing by `stride` words.

    A document shorter than the window is one passage; the last window always reaches the end, so
    no text is dropped. Passage ids are consecutive over the corpus order.
    """
    if words_per_passage <= 0 or stride <= 0 or stride > words_per_passage:
        raise ValueError("need 0 < stride <= words_per_passage")
    pid = 0
    for doc in documents:
        words = doc.text.split()
        starts = list(range(0, max(len(words) - words_per_passage, 0) + 1, stride))
        if starts[-1] + words_per_passage < len(words):
            starts.append(len(words) - words_per_passage)
        for start in starts:
            yield Passage(pid, doc.id, doc.title, " ".join(words[start:start + words_per_passage]), doc.domain)
            pid += 1


def validate_corpus(path: str | Path) -> int:
    """Stream through a corpus once, raising on the first bad row or duplicate id; return the count.

    Runs before any index folder is created, so bad input never leaves a half-built index behind. The errors
    (and which one comes first) are those of a single pass remembering every id, but the memory is 8 bytes per
    document: a 64-bit hash of each id, in numpy blocks, sorted at the end; ids whose hash repeats are
    confirmed by reading the file again (only when there is a repeat: a real duplicate, or one chance in
    2**64 / documents**2 of two ids sharing a hash).
    """
    path = resolve_corpus_path(path)
    hashes = _Growing(np.uint64)
    try:
        for _, _, _, doc in _scan(path):
            hashes.append(id_hash(doc.id))
    except InputError as exc:  # a duplicate on an earlier line is the first error of the file
        duplicate = _first_duplicate_by_rescan(path, hashes.array(), exc.line)
        if duplicate is not None:
            raise duplicate from None
        raise
    n = len(hashes)
    if not n:
        raise InputError("corpus is empty", path)
    duplicate = _first_duplicate_by_rescan(path, hashes.array(), None)
    if duplicate is not None:
        raise duplicate
    return n
