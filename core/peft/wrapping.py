"""Reaching the HF model inside a sentence-transformers model (duck-typed, no import needed).

A SentenceTransformer is an ``nn.Sequential`` whose first module exposes ``auto_model``. Methods
that edit modules in place work on that inner model; methods that wrap it (prefix tuning
returns a peft ``PeftModel``) put the wrapper back in its place.
"""
from __future__ import annotations

from torch import nn


def _holder(model: nn.Module) -> nn.Module | None:
    if isinstance(model, nn.Sequential) and len(model) and hasattr(model[0], "auto_model"):
        return model[0]
    return None


def inner_model(model: nn.Module) -> nn.Module:
    """The HF model to adapt: ``model[0].auto_model`` for a SentenceTransformer, else ``model``."""
    holder = _holder(model)
    return holder.auto_model if holder is not None else model


def replace_inner_model(model: nn.Module, new: nn.Module) -> nn.Module:
    """Return the model to use after the inner HF model became ``new``."""
    holder = _holder(model)
    if holder is None:
        return new
    if holder.auto_model is not new:
        # sentence-transformers >= 5 keeps the model in ``.model`` behind a read-only property.
        attr = "model" if isinstance(getattr(type(holder), "auto_model", None), property) else "auto_model"
        setattr(holder, attr, new)
    return model
