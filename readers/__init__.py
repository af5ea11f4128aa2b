"""Readers: Fusion-in-Decoder (seq2seq) and decoder-only (causal) readers, CIT, cloze data and training.

Reader kinds are registered in `readers.kinds.READER_KINDS`. Attributes load lazily, so listing the kinds
(`from readers.kinds import READER_KINDS`) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {name: "readers.base" for name in
            ("BaseReader", "Reader", "ReaderConfig", "ReaderPassage", "load_reader", "reader_class")}
_EXPORTS["READER_KINDS"] = "readers.kinds"

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'readers' has no attribute {name!r}")
