"""``full``: ordinary fine-tuning, every parameter trained (the reference point for the others)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from core.peft.config import PeftMethodConfig


@dataclass
class FullConfig(PeftMethodConfig):
    """No knobs."""


def apply_full(model: nn.Module, config: FullConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
