"""The cell-kind registry: CELL_KINDS (name -> CellKind) names what a swap config's `kind:` may be; rag/swap/cells.py
registers the built-in kinds (bm25, dense, generative, rerank, reader). Kept apart from cells.py so that config validation
(rag/swap/config.py) can read it without importing the cells."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import RagError


class CellUnavailable(RagError):
    """The cell's kind (or a module it needs) is not in this build: reported, never retried or faked."""


@dataclass(frozen=True)
class CellKind:
    """run(cell, workdir) -> metrics. index: the index kind (retrievers/index_kinds.py) its cells read (None: none, or its retriever
    model's); available() -> None, or why the kind is not in this build (its cells are then "unavailable"); answers:
    its cells score answers too (em, f1, KILT-*), so a config may ask for those metrics."""
    run: Callable[[Any, Path], dict[str, Any]]   # (CellSpec, workdir) -> metrics
    index: str | None = None
    available: Callable[[], str | None] | None = None
    description: str = ""
    answers: bool = False


CELL_KINDS: dict[str, CellKind] = {}   # filled by rag/swap/cells.py
