"""LoRA in the ecosystem's formats: a PEFT adapter folder, and a copy of the model with the update merged in.

The toolkit injects LoRA with `peft.inject_adapter_in_model` (the model keeps its class); these turn such a
model into what other tools load: `adapter_config.json` + `adapter_model.safetensors` (PEFT's own layout,
`PeftModel.from_pretrained(base, folder)`), or plain weights with `W + (alpha/r) B A` folded in.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from core.peft.config import PeftError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer
    return any(isinstance(m, LoraLayer) for m in model.modules())


def merged_lora_copy(model: Any) -> Any:
    """A deep copy whose LoRA layers are folded into plain Linear weights (the original keeps its adapter)."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    for module in merged.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(module, name, child.get_base_layer())
    for module in merged.modules():  # no longer an adapted model: save_pretrained writes plain weights
        if "peft_config" in vars(module):
            del module.peft_config
    return merged


def save_lora_adapter(hf_model: nn.Module, base_name_or_path: str, out: str | Path) -> Path:
    """PEFT's adapter files for the LoRA layers injected into `hf_model` (a transformers model)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    configs = getattr(hf_model, "peft_config", None) or {}
    config = next(iter(configs.values()), None)
    if not isinstance(config, PeftLoraConfig):
        raise PeftError(f"save_lora_adapter: {type(hf_model).__name__} carries no LoRA config")
    config = copy.deepcopy(config)
    config.base_model_name_or_path = base_name_or_path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    state = get_peft_model_state_dict(hf_model)
    save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()},
              str(out / ADAPTER_WEIGHTS))
    return out
