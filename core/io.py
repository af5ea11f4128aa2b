"""File helpers: strict JSONL reading with precise errors, and atomic writes (temp path, then rename)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from core.errors import InputError, RagError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; bad UTF-8 or JSON raises InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"invalid UTF-8 at byte {exc.start}", path, lineno) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"malformed JSON ({exc.msg} at column {exc.colno})", path, lineno) from None
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object, got {type(obj).__name__}", path, lineno)
            yield lineno, obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path)]


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temp file beside `path`; it replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_file(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, default=str)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON ({exc.msg})", path, exc.lineno) from None


def prepare_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty folder unless overwrite; return the final path (not created yet)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RagError(f"{out} already exists; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, work_dir: str | Path | None = None) -> Iterator[Path]:
    """Build a folder under a temp name and rename it into place at the end.

    A failure removes the temp folder, so no half-written folder ever exists at `out`.
    `work_dir` lets a caller keep a persistent staging folder (for resumable builds): it is
    kept on failure and renamed on success.
    """
    out = prepare_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    keep_on_failure = work_dir is not None
    staging = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
    except BaseException:
        if not keep_on_failure:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
