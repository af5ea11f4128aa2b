"""Corpus loading in the formats people already have, strict validation, and passage splitting.

Reads the toolkit's own JSONL (`id`, `title`, `text`, optional `domain`, `anchors`), Pyserini
(`id`, `contents`), BEIR (`_id`, `title`, `text`) and the KILT knowledge source (`wikipedia_id`,
`wikipedia_title`, `text` as a list of paragraphs). Every error names the file, line and field.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputError
from core.io import iter_jsonl


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
    title = _require_str(obj, "title", path, line)
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


def iter_documents(path: str | Path) -> Iterator[tuple[int, Document]]:
    path = resolve_corpus_path(path)
    for line, obj in iter_jsonl(path):
        yield line, _parse_row(obj, path, line)


class Corpus:
    """An in-memory corpus with id lookup. Use `iter_documents` to stream very large files."""

    def __init__(self, documents: list[Document], path: Path | None = None, checksum: str | None = None) -> None:
        self.documents = documents
        self.path = path
        self.checksum = checksum
        self._by_id = {d.id: i for i, d in enumerate(documents)}

    @classmethod
    def load(cls, path: str | Path) -> Corpus:
        """Load and validate: bad rows, duplicate ids and an empty corpus raise InputError."""
        path = resolve_corpus_path(path)
        docs: list[Document] = []
        first_line: dict[str, int] = {}
        for line, doc in iter_documents(path):
            if doc.id in first_line:
                raise InputError(f"duplicate id {doc.id!r} (first seen on line {first_line[doc.id]})",
                                 path, line, "id")
            first_line[doc.id] = line
            docs.append(doc)
        if not docs:
            raise InputError("corpus is empty", path)
        return cls(docs, path, file_checksum(path))

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._by_id

    def get(self, doc_id: str) -> Document:
        return self.documents[self._by_id[doc_id]]

    def by_title(self) -> dict[str, Document]:
        return {d.title: d for d in self.documents}

    def passages(self, words_per_passage: int = 100, stride: int = 80) -> list[Passage]:
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

    Runs before any index folder is created, so bad input never leaves a half-built index behind.
    Memory: one set of ids.
    """
    path = resolve_corpus_path(path)
    first_line: dict[str, int] = {}
    for line, doc in iter_documents(path):
        if doc.id in first_line:
            raise InputError(f"duplicate id {doc.id!r} (first seen on line {first_line[doc.id]})", path, line, "id")
        first_line[doc.id] = line
    if not first_line:
        raise InputError("corpus is empty", path)
    return len(first_line)
