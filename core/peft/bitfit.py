"""``bitfit``: train only the bias terms (Ben Zaken et al., 2022); everything else frozen."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from core.peft.config import PeftError, PeftMethodConfig


@dataclass
class BitFitConfig(PeftMethodConfig):
    """No knobs: the set of trained parameters is fixed by the architecture."""


def is_bias(name: str) -> bool:
    return name.rpartition(".")[2] == "bias"


def apply_bitfit(model: nn.Module, config: BitFitConfig) -> nn.Module:
    found = False
    for name, p in model.named_parameters():
        p.requires_grad_(is_bias(name))
        found = found or is_bias(name)
    if not found:
        raise PeftError(f"bitfit: {type(model).__name__} has no bias parameters "
                        "(T5-style models use bias-free linears and norms)")
    return model
