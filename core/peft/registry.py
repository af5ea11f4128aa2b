"""The one mapping from method name to (config class, apply function).

Adding a method = one module with a config dataclass and an ``apply_<name>(model, config)``
returning the model to use, plus one line here.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import nn

from core.peft.adapter import AdapterConfig, apply_adapter
from core.peft.bitfit import BitFitConfig, apply_bitfit
from core.peft.config import PeftMethodConfig
from core.peft.full import FullConfig, apply_full
from core.peft.iaa import IAAConfig, apply_iaa
from core.peft.lora import LoraConfig, apply_lora
from core.peft.prefix import PrefixConfig, apply_prefix


class PeftMethod(NamedTuple):
    config_cls: type[PeftMethodConfig]
    apply: Callable[[nn.Module, PeftMethodConfig], nn.Module]


PEFT_METHODS: dict[str, PeftMethod] = {
    "iaa": PeftMethod(IAAConfig, apply_iaa),
    "adapter": PeftMethod(AdapterConfig, apply_adapter),
    "lora": PeftMethod(LoraConfig, apply_lora),
    "prefix": PeftMethod(PrefixConfig, apply_prefix),
    "bitfit": PeftMethod(BitFitConfig, apply_bitfit),
    "full": PeftMethod(FullConfig, apply_full),
}
