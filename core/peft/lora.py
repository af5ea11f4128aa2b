"""``lora``: low-rank updates of the attention query/value projections, via the peft library.

Uses ``peft.inject_adapter_in_model`` so the model keeps its own class (``generate()``,
sentence-transformers and our save format work unchanged); peft freezes the base weights and
initialises lora_B to zero, so outputs start equal to the base model's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig as _PeftLoraConfig
from peft import inject_adapter_in_model
from torch import nn

from core.peft.config import PeftError, PeftMethodConfig

# Query/value projection names per naming convention: BERT, T5, BART (and most *_proj models).
_QUERY_VALUE_NAMES: tuple[tuple[str, str], ...] = (("query", "value"), ("q", "v"), ("q_proj", "v_proj"))


@dataclass
class LoraConfig(PeftMethodConfig):
    """LoRA on linear layers; targets default to the attention query and value projections."""

    rank_field = "r"

    r: int = field(default=8, metadata={"help": "Rank of each low-rank update (1..hidden size)."})
    alpha: int = field(default=16, metadata={"help": "Scaling numerator: updates are scaled by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input during training."})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "Names of the linear modules to adapt; None picks the query/value projections."})


def default_targets(model: nn.Module) -> list[str]:
    """The first query/value naming convention whose both names occur among the model's linears."""
    names = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in _QUERY_VALUE_NAMES:
        if names.issuperset(pair):
            return list(pair)
    raise PeftError(f"cannot guess LoRA target modules for {type(model).__name__}; pass target_modules")


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    peft_cfg = _PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=config.target_modules or default_targets(model), bias="none")
    return inject_adapter_in_model(peft_cfg, model)
