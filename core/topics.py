"""Queries in the IR formats beside KILT JSONL: TREC topics TSV (`qid<TAB>text`, as Pyserini ships them)
and BEIR `queries.jsonl` (`{"_id", "text"}`). `load_topics` picks the format from the file."""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import InputError

Topic = tuple[str, str]  # (query id, query text)


def _check(qid: str, text: str, seen: set[str], path: Path, line: int) -> None:
    if not qid or any(ch.isspace() for ch in qid) or "\x00" in qid:
        raise InputError(f"query id {qid!r} is empty or contains whitespace or NUL", path, line, "id")
    if not text.strip():
        raise InputError("empty query text", path, line, "text")
    if qid in seen:
        raise InputError(f"duplicate query id {qid!r}", path, line, "id")
    seen.add(qid)


def load_trec_topics(path: str | Path) -> list[Topic]:
    """`qid<TAB>text` per line (Pyserini's topics TSV)."""
    path = Path(path)
    queries: list[Topic] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"invalid UTF-8 at byte {exc.start}", path) from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        qid, sep, text = line.partition("\t")
        if not sep:
            raise InputError("expected `qid<TAB>query text`", path, line_no)
        _check(qid.strip(), text, seen, path, line_no)
        queries.append((qid.strip(), text.strip()))
    return queries


def load_beir_queries(path: str | Path) -> list[Topic]:
    """BEIR queries.jsonl: `{"_id": ..., "text": ...}` per line."""
    from core.io import iter_jsonl

    path = Path(path)
    queries: list[Topic] = []
    seen: set[str] = set()
    for line_no, obj in iter_jsonl(path):
        qid, text = obj.get("_id"), obj.get("text")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise InputError("missing or not a string", path, line_no, "_id")
        if not isinstance(text, str):
            raise InputError("missing or not a string", path, line_no, "text")
        _check(str(qid), text, seen, path, line_no)
        queries.append((str(qid), text.strip()))
    return queries


def topics_format(path: str | Path) -> str:
    """"kilt" (JSONL with `input`), "beir" (JSONL with `_id`) or "trec" (anything else: `qid<TAB>text`)."""
    with open(path, "rb") as fh:
        first = next((line for line in fh if line.strip()), b"")
    if not first.strip():
        raise InputError("no queries (the file is empty)", path)
    if not first.lstrip().startswith(b"{"):
        return "trec"
    try:
        obj = json.loads(first)
    except (ValueError, RecursionError):
        return "kilt"  # let the strict KILT reader name the line
    return "beir" if isinstance(obj, dict) and "_id" in obj and "input" not in obj else "kilt"


def load_topics(path: str | Path) -> list[Topic]:
    """TREC topics TSV or BEIR queries.jsonl, told apart by the first non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "not a file", path)
    kind = topics_format(path)
    if kind == "kilt":
        raise InputError("a JSONL file of queries here must be BEIR queries.jsonl (`_id`, `text`); "
                         "KILT files go to --queries", path, 1)
    return load_beir_queries(path) if kind == "beir" else load_trec_topics(path)
