"""The one mapping from method name to (config class, apply function).

Adding a method = one module with a config dataclass and an ``apply_<name>(model, config)``
returning the model to use, plus one line here.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import nn

from core.peft.adapter import AdapterConfig, apply_adapter
from core.peft.bitfit import BitFitConfig, apply_bitfit
from core.peft.config import PeftError, PeftMethodConfig
from core.peft.full import FullConfig, apply_full
from core.peft.iaa import IAAConfig, apply_iaa
from core.peft.lora import LoraConfig, apply_lora
from core.peft.prefix import PrefixConfig, apply_prefix


class PeftMethod(NamedTuple):
    config_cls: type[PeftMethodConfig]
    apply: Callable[[nn.Module, PeftMethodConfig], nn.Module]
    # Peak learning rate when the user gives none. None (full tuning): the trainer's own full-tuning rate,
    # which depends on the model (every trainer names it); added modules want a larger step.
    default_lr: float | None = None
    # False where the method does not fit encoder-decoder models (prefix tuning and EncoderDecoderModel).
    seq2seq: bool = True


PEFT_METHODS: dict[str, PeftMethod] = {
    "iaa": PeftMethod(IAAConfig, apply_iaa, default_lr=1e-3),
    "adapter": PeftMethod(AdapterConfig, apply_adapter, default_lr=1e-3),
    "lora": PeftMethod(LoraConfig, apply_lora, default_lr=5e-4),
    "prefix": PeftMethod(PrefixConfig, apply_prefix, default_lr=5e-3, seq2seq=False),
    "bitfit": PeftMethod(BitFitConfig, apply_bitfit, default_lr=5e-4),
    "full": PeftMethod(FullConfig, apply_full, default_lr=None),
}


def method_names(seq2seq: bool = False) -> list[str]:
    """Registered method names (only those that fit encoder-decoder models with `seq2seq=True`)."""
    return [name for name, m in PEFT_METHODS.items() if m.seq2seq or not seq2seq]


def method_lr(name: str, full_lr: float) -> float:
    """The default peak learning rate of a method; `full_lr` is the calling trainer's full-tuning rate."""
    if name not in PEFT_METHODS:
        raise PeftError(f"unknown PEFT method {name!r}; allowed: {sorted(PEFT_METHODS)}")
    lr = PEFT_METHODS[name].default_lr
    return full_lr if lr is None else lr
