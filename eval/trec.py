"""TREC run files (six columns: qid Q0 docid rank score tag), as trec_eval and Pyserini read them."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import InputError
from core.io import atomic_file


def write_trec(path: str | Path, query_ids: Sequence[str], rankings: Sequence[Sequence[Any]], tag: str = "rag") -> None:
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
