"""KILT task files: read queries and golds with precise errors, write guesses."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.corpus import check_unicode, clean_id
from core.errors import InputError
from core.io import iter_jsonl, write_jsonl


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    domain: str | None = None


def load_queries(path: str | Path) -> list[Query]:
    """Read `id` and `input` from a KILT file (the outputs, if any, are the evaluator's business), or the
    queries of a TREC topics TSV (`qid<TAB>text`) or a BEIR queries.jsonl (`_id`, `text`).

    Ids are strings or integers (core.corpus.clean_id); text that could not be written back (a lone
    surrogate) is refused here, not when the guesses are written after the work.
    """
    check_input_file(path)
    from core.topics import load_topics, topics_format

    if topics_format(path) != "kilt":  # TREC topics TSV or BEIR queries.jsonl
        return [Query(qid, text) for qid, text in load_topics(path)]
    queries, seen = [], set()
    for line, obj in iter_jsonl(path):
        if "id" not in obj:
            raise InputError("missing", path, line, "id")
        if not isinstance(obj.get("input"), str) or not obj["input"].strip():
            raise InputError("missing or empty", path, line, "input")
        qid = clean_id(obj["id"], path, line, "id")
        check_unicode(obj["input"], path, line, "input")
        if qid in seen:
            raise InputError(f"duplicate id {qid!r}", path, line, "id")
        seen.add(qid)
        domain = (obj.get("meta") or {}).get("domain") if isinstance(obj.get("meta"), dict) else None
        if domain is not None and not isinstance(domain, str):
            raise InputError(f"expected a string, got {type(domain).__name__}", path, line, "meta.domain")
        queries.append(Query(qid, obj["input"], domain))
    if not queries:
        raise InputError("no queries", path)
    return queries


def guess_rows(queries: Sequence[Query], rankings: Sequence[Sequence[Any]],
               answers: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
    """KILT guesses: one output per query holding the ranked provenance (and the answer if any)."""
    rows = []
    for i, (query, hits) in enumerate(zip(queries, rankings)):
        output: dict[str, Any] = {"provenance": [hit.provenance() for hit in hits]}
        if answers is not None:
            output["answer"] = answers[i]
        rows.append({"id": query.id, "input": query.text, "output": [output]})
    return rows


def check_input_file(path: str | Path) -> None:
    """A file to read: refuse a folder or a missing path with one line naming it."""
    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder; expected a JSONL file", path)
    if not path.exists():
        raise InputError("file not found", path)


def write_guesses(path: str | Path, queries: Sequence[Query], rankings: Sequence[Sequence[Any]],
                  answers: Sequence[str | None] | None = None) -> int:
    return write_jsonl(path, guess_rows(queries, rankings, answers))
