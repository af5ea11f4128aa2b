"""The one import of faiss: with neither extra installed, a one-line error instead of a traceback.

faiss comes from an extra, never from the required dependencies: `cpu` (faiss-cpu) or `gpu` (faiss-gpu-cu12).
Both wheels unpack into one `faiss/` folder, so exactly one of them may be installed.
"""
from __future__ import annotations

from typing import Any

from core.errors import RagError


class FaissMissing(RagError, ImportError):
    """faiss is not importable; an ImportError too, so optional-feature probes keep working."""


INSTALL_HINT = "pip install -e '.[cpu]' (faiss-cpu) or -e '.[gpu]' (faiss-gpu-cu12, NVIDIA GPUs), never both"

try:
    import faiss as _faiss
except ImportError as exc:
    raise FaissMissing(f"faiss is not installed ({exc}); {INSTALL_HINT}") from None

faiss: Any = _faiss  # SWIG classes: their stubs miss most fields and keyword constructors

__all__ = ["faiss", "FaissMissing", "INSTALL_HINT"]
