"""Versions of the packages that shape results: recorded in every manifest and run folder."""
from __future__ import annotations

import platform
from importlib import metadata

TRACKED = ("rag-toolkit", "torch", "transformers", "sentence-transformers", "faiss-cpu", "faiss-gpu-cu12",
           "bm25s", "numpy", "peft", "ray", "pyserini")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
