"""Manifests: every index and model folder says what built it, and loading checks it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.errors import ManifestMismatch, RagError
from core.io import read_json, write_json
from core.versions import package_versions

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def write_manifest(folder: str | Path, kind: str, **fields: Any) -> dict[str, Any]:
    manifest = {"kind": kind, "format_version": FORMAT_VERSION, **fields,
                "versions": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read a folder's manifest; a folder without one is not a finished artefact."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise RagError(f"{folder} has no {MANIFEST}: not a finished index (an interrupted build?)")
    manifest = read_json(path)
    if kind is not None and manifest.get("kind") != kind:
        raise ManifestMismatch(f"{folder} holds a {manifest.get('kind')!r} index, not {kind!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ManifestMismatch(f"{folder} was written by a newer toolkit (format {manifest['format_version']})")
    return manifest


def check_expected(folder: str | Path, manifest: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise ManifestMismatch listing every key whose value differs from what the caller expects."""
    diffs = [f"{key}: index has {manifest.get(key)!r}, asked for {value!r}"
             for key, value in expected.items() if value is not None and manifest.get(key) != value]
    if diffs:
        raise ManifestMismatch(f"{folder} does not match: " + "; ".join(diffs))
