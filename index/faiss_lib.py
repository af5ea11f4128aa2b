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

# Memory-mapped reading (faiss.read_index flags). IO_FLAG_MMAP_IFC (newer faiss; 1.15 has it) maps the codes where they
# lie in the file: flat codes (Flat, SQ, PQ, refine stages), IVF lists, HNSW's vector storage. Older faiss only
# has IO_FLAG_MMAP, which maps IVF lists (as OnDiskInvertedLists) and nothing else.
HAS_MMAP_IN_FILE_CODES = hasattr(_faiss, "IO_FLAG_MMAP_IFC")
HAS_MMAP_IVF = hasattr(_faiss, "IO_FLAG_MMAP")

__all__ = ["faiss", "FaissMissing", "INSTALL_HINT", "HAS_MMAP_IN_FILE_CODES", "HAS_MMAP_IVF"]
