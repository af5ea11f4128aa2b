"""Manifests: every index and model folder says what built it, and loading checks it.

`write_manifest` records, besides what the builder passes, `files`: every file of the folder (the manifest
itself aside) with its size in bytes and a sha256. Opening an index checks the sizes (`check_files`, cheap);
`verify_index` re-hashes every file (`rag index verify DIR`). Folders written before `files` existed still
open, with one log warning.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.corpus import file_checksum
from core.errors import InputError, ManifestMismatch, RagError
from core.io import read_json, write_json
from core.versions import package_versions

MANIFEST = "manifest.json"
# 1: the passage table's document table is one JSON list, docs.json (still read, loaded whole);
# 2: it is docs.jsonl + doc_offsets.npy, memory-mapped (index/passages.py). A toolkit reading only format 1
#    refuses a format-2 folder with "written by a newer toolkit" instead of a misleading missing docs.json.
FORMAT_VERSION = 2
# Packages whose version decides how the files are read: a difference is worth a warning on open.
FILE_READERS = ("faiss-cpu", "faiss-gpu-cu12", "bm25s", "numpy")

logger = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()  # (folder, what): log each warning once per folder and process


def _warn_once(folder: Path, what: str, message: str, *args: Any) -> None:
    key = (str(Path(os.path.abspath(folder))), what)
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def file_sha256(path: str | Path) -> str:
    """"sha256:<hex>" of a file, read in 1 MiB blocks (memory stays flat for any size)."""
    return file_checksum(path, "sha256")


def describe_files(folder: str | Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"size", "sha256"}} for every regular file under `folder` but its manifest."""
    folder = Path(folder)
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        name = path.relative_to(folder).as_posix()
        if name == MANIFEST:
            continue
        out[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return out


def write_manifest(folder: str | Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Write the folder's manifest last, once every other file is final: it records their sizes and checksums."""
    files = fields.pop("files", None)
    manifest = {"kind": kind, "format_version": FORMAT_VERSION, **fields,
                "files": files if files is not None else describe_files(folder),
                "versions": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def _schema_error(path: Path, key: str, problem: str) -> InputError:
    return InputError(f"{problem}; the manifest is damaged or hand-edited: rebuild the index", path, field=key)


def validate_manifest(path: Path, manifest: Any) -> dict[str, Any]:
    """Check a manifest's own schema: `kind` (text), `format_version` (an integer this toolkit reads) and
    `files` (when present: name -> {size, sha256}). Each problem is a one-line error naming file and key."""
    if not isinstance(manifest, dict):
        raise InputError(f"a manifest must hold a JSON object, not {type(manifest).__name__}", path)
    for key in ("kind", "format_version"):
        if key not in manifest:
            raise _schema_error(path, key, "missing required key")
    if not isinstance(manifest["kind"], str) or not manifest["kind"]:
        raise _schema_error(path, "kind", f"must be a non-empty string, got {manifest['kind']!r}")
    version = manifest["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise _schema_error(path, "format_version", f"must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ManifestMismatch(f"{path.parent} was written by a newer toolkit (format {version}; this one reads "
                               f"up to {FORMAT_VERSION}): upgrade rag-toolkit or rebuild the index")
    if version < 1:
        raise _schema_error(path, "format_version", f"unsupported format {version} (this toolkit reads 1 to "
                                                    f"{FORMAT_VERSION})")
    files = manifest.get("files")
    if files is not None:
        if not isinstance(files, Mapping):
            raise _schema_error(path, "files", f"must be a mapping of file name to size and sha256, "
                                               f"got {type(files).__name__}")
        for name, record in files.items():
            field = f"files.{name}"
            if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise _schema_error(path, field, "not a relative path inside the index folder")
            if not isinstance(record, Mapping):
                raise _schema_error(path, field, "must map to {size, sha256}")
            size = record.get("size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise _schema_error(path, f"{field}.size", f"must be a byte count, got {size!r}")
            digest = record.get("sha256")
            if not isinstance(digest, str) or not digest.startswith("sha256:"):
                raise _schema_error(path, f"{field}.sha256", f"must be 'sha256:<hex>', got {digest!r}")
    return manifest


def read_manifest(folder: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read and validate a folder's manifest; a folder without one is not a finished artefact."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise RagError(f"{folder} has no {MANIFEST}: not a finished index (an interrupted build?)")
    manifest = validate_manifest(path, read_json(path))
    if kind is not None and manifest["kind"] != kind:
        raise ManifestMismatch(f"{folder} holds a {manifest['kind']!r} index, not {kind!r}")
    return manifest


def require_keys(folder: str | Path, manifest: dict[str, Any], keys: Mapping[str, type | tuple[type, ...]]) -> None:
    """One-line error for the first key of `keys` ("counts.passages" reaches into a mapping) that is missing
    from the manifest or has the wrong type: what a kind needs to open its folder."""
    path = Path(folder) / MANIFEST
    for key, types in keys.items():
        value: Any = manifest
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise _schema_error(path, key, f"missing required key (a {manifest.get('kind')!r} index needs it)")
            value = value[part]
        wanted = types if isinstance(types, tuple) else (types,)
        if (isinstance(value, bool) and bool not in wanted) or not isinstance(value, wanted):
            names = " or ".join(t.__name__ for t in wanted)
            raise _schema_error(path, key, f"must be {names}, got {value!r}")


def check_files(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Cheap check on open: every file the manifest records exists with the recorded size.

    Catches truncated, missing and swapped-in files of another size; `verify_index` also compares checksums.
    """
    folder = Path(folder)
    files = manifest.get("files")
    if files is None:
        _warn_once(folder, "files", "%s: the manifest records no file sizes or checksums (an index built before "
                   "they were recorded); it opens unchecked: rebuild it to have it checked", folder)
        return
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            raise RagError(f"{path}: missing (the manifest records it, {record['size']} bytes); the index is "
                           "damaged: rebuild it")
        size = path.stat().st_size
        if size != record["size"]:
            raise RagError(f"{path}: {size} bytes, the manifest records {record['size']}: truncated, or a file of "
                           "another index; rebuild the index")


def check_versions(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Log (once per folder) the packages reading the files whose version differs from the build's."""
    built = manifest.get("versions")
    if not isinstance(built, Mapping):
        return
    now = package_versions()
    diffs = [f"{name} {built[name]} (index) vs {now[name]} (now)" for name in FILE_READERS
             if name in built and name in now and built[name] != now[name]]
    if diffs:
        _warn_once(Path(folder), "versions", "%s was built with other package versions: %s; if results look "
                   "wrong, rebuild it", folder, "; ".join(diffs))


def check_expected(folder: str | Path, manifest: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise ManifestMismatch listing every key whose value differs from what the caller expects."""
    diffs = [f"{key}: index has {manifest.get(key)!r}, asked for {value!r}"
             for key, value in expected.items() if value is not None and manifest.get(key) != value]
    if diffs:
        raise ManifestMismatch(f"{folder} does not match: " + "; ".join(diffs))


def verify_index(folder: str | Path) -> dict[str, Any]:
    """Check every file of an index folder against its manifest: size and sha256 of each recorded file, then
    the counts the files hold (passages, Faiss vectors and dimension) against the manifest.

    Returns {"folder", "kind", "ok", "checked" (files hashed), "problems" (one line each), "files"
    (name -> "ok" | "missing" | "size" | "checksum"), "unrecorded" (files the manifest does not list)}.
    A damaged manifest raises (as `read_manifest`); a folder without `files` gets ok False and says why.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    report: dict[str, Any] = {"folder": str(folder), "kind": manifest["kind"], "ok": True, "checked": 0,
                              "problems": [], "files": {}, "unrecorded": []}
    problems: list[str] = report["problems"]
    files = manifest.get("files")
    if files is None:
        problems.append(f"{folder}: the manifest records no file checksums (an index built before they were "
                        "recorded): nothing to verify against; rebuild the index")
        report["ok"] = False
        return report
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            report["files"][name] = "missing"
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != record["size"]:
            report["files"][name] = "size"
            problems.append(f"{path}: {size} bytes, the manifest records {record['size']}")
            continue
        digest = file_sha256(path)
        report["checked"] += 1
        if digest != record["sha256"]:
            report["files"][name] = "checksum"
            problems.append(f"{path}: sha256 differs from the manifest's (content changed: flipped bytes or a "
                            "file of another index)")
        else:
            report["files"][name] = "ok"
    present = _file_names(folder)
    report["unrecorded"] = sorted(present - set(files))
    if not problems:
        problems.extend(_count_problems(folder, manifest))
    report["ok"] = not problems
    return report


def _file_names(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and not p.is_symlink()} - {MANIFEST}


def _count_problems(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """The counts the files hold against the manifest's (only once every checksum matched)."""
    from index.passages import PASSAGES, PassageStore

    problems: list[str] = []
    counts = manifest.get("counts")
    passages = counts.get("passages") if isinstance(counts, Mapping) else None
    passages = passages if isinstance(passages, int) and not isinstance(passages, bool) else None
    if (folder / PASSAGES).is_file():
        try:
            with PassageStore(folder, expected=passages) as store:
                store.verify()
        except RagError as exc:
            problems.append(str(exc))
    if manifest["kind"] == "dense":
        from index.faiss_index import INDEX_FILE, FaissIndex
        if (folder / INDEX_FILE).is_file():
            try:
                index = FaissIndex.load(folder, str(manifest.get("faiss", "")))
                index.check_shape(folder, passages, manifest.get("dim") if isinstance(manifest.get("dim"), int)
                                  else None)
            except RagError as exc:
                problems.append(str(exc))
    return problems
