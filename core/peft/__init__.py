"""Parameter-efficient fine-tuning for the toolkit's encoders and generators.

Methods (see ``registry.PEFT_METHODS``): ``iaa`` (connected adapters), ``adapter`` (the same
bottlenecks without the chain), ``lora`` and ``prefix`` (through the peft library), ``bitfit``
and ``full``.
"""
from core.peft.api import apply_peft, count_parameters, load_peft, peft_config, save_peft, trainable_state_dict
from core.peft.config import PeftError, PeftMethodConfig
from core.peft.disable import adapters_disabled, can_disable_adapters
from core.peft.layers import LayerStack, find_layer_stacks
from core.peft.registry import PEFT_METHODS, PeftMethod, method_lr, method_names

__all__ = [
    "PEFT_METHODS", "PeftError", "PeftMethod", "PeftMethodConfig", "LayerStack", "adapters_disabled", "apply_peft",
    "can_disable_adapters",
    "count_parameters", "find_layer_stacks", "load_peft", "peft_config", "save_peft",
    "trainable_state_dict", "method_lr", "method_names",
]
