"""Errors the toolkit raises for bad input, so the CLI can print them without a traceback."""
from __future__ import annotations

from pathlib import Path


class RagError(Exception):
    """Base class: a problem the user can fix (bad input, bad flags, mismatched artefacts)."""


class InputError(RagError):
    """Bad input data; names the file, the line and the field where known."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field = path, line, field
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join([', '.join(where)] if where else [])}{': ' if where else ''}{message}")


class ManifestMismatch(RagError):
    """An artefact's manifest does not match what the caller asked for."""
