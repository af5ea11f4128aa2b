"""TREC run files (six columns: qid Q0 docid rank score tag), as trec_eval and Pyserini read them."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import InputError, RagError
from core.io import atomic_file


def check_trec_id(value: str, what: str) -> str:
    """TREC runs are whitespace-separated: an id with a space, tab or newline would shift or forge columns."""
    text = str(value)
    if not text or any(ch.isspace() for ch in text):
        raise RagError(f"{what} {text!r} cannot be written to a TREC run (empty or contains whitespace); "
                       "rename it in the input")
    return text


def write_trec(path: str | Path, query_ids: Sequence[str], rankings: Sequence[Sequence[Any]], tag: str = "rag") -> None:
    """Six columns per hit; ids that the format cannot hold are refused before anything is written."""
    tag = check_trec_id(tag, "run tag")
    for qid, hits in zip(query_ids, rankings):
        check_trec_id(qid, "query id")
        for hit in hits:
            check_trec_id(hit.doc_id, "document id")
    with atomic_file(path) as fh:
        for qid, hits in zip(query_ids, rankings):
            for rank, hit in enumerate(hits, start=1):
                fh.write(f"{qid} Q0 {hit.doc_id} {rank} {hit.score:.6f} {tag}\n")


def read_trec(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    run: dict[str, list[tuple[str, float]]] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise InputError(f"expected 6 columns, got {len(parts)}", path, line_no)
            qid, _, docid, _, score, _ = parts
            run.setdefault(qid, []).append((docid, float(score)))
    return run
