"""Finding the transformer layer stacks of a HF model, and editing a layer's hidden output.

Discovery is structural rather than per-architecture: a layer stack is an ``nn.ModuleList``
whose elements all share one class and hold parameters, and which is not nested inside another
such list (T5's ``block[i].layer`` lists are sub-layers of a block, not a stack). That finds
BERT ``encoder.layer``, T5 ``encoder.block``/``decoder.block``, BART
``model.{encoder,decoder}.layers`` and EncoderDecoderModel ``encoder.encoder.layer`` /
``decoder.bert.encoder.layer`` with no table of names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.peft.config import PeftError


@dataclass(frozen=True)
class LayerStack:
    """One stack of blocks and the module that owns it (whose forward runs the whole stack)."""

    name: str
    layers: nn.ModuleList
    owner: nn.Module
    width: int


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = type(module[0])
    return all(type(m) is first for m in module) and any(True for _ in module[0].parameters())


def _config_width(config: Any) -> int | None:
    width = getattr(config, "hidden_size", None)
    return width if isinstance(width, int) else None


def _last_linear_width(layer: nn.Module) -> int | None:
    """Fallback: a block's last linear map writes back to the residual stream."""
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def find_layer_stacks(model: nn.Module) -> list[LayerStack]:
    """All outermost homogeneous ModuleLists of blocks, in module order (encoder before decoder)."""
    modules = dict(model.named_modules())
    stacks: list[LayerStack] = []
    for name, module in modules.items():
        if not _is_block_list(module) or any(name.startswith(s.name + ".") for s in stacks):
            continue
        owner = modules[name.rpartition(".")[0]]
        width = (_config_width(getattr(owner, "config", None))
                 or _config_width(getattr(model, "config", None))
                 or _last_linear_width(module[0]))
        if width is None:
            raise PeftError(f"cannot tell the hidden size of layer stack '{name}'")
        stacks.append(LayerStack(name, module, owner, width))
    return stacks


def model_width(model: nn.Module) -> int | None:
    """Narrowest hidden size of the model's stacks (the bound for any bottleneck rank)."""
    stacks = find_layer_stacks(model)
    if stacks:
        return min(s.width for s in stacks)
    return _config_width(getattr(model, "config", None))


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden state of a layer's output: the tensor itself or the first tuple element."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(hidden, torch.Tensor):
        raise PeftError(f"layer returned {type(output).__name__}; expected a tensor or a tuple starting with one")
    return hidden


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden state replaced, keeping the other elements (caches, biases)."""
    if isinstance(output, (tuple, list)):
        return type(output)([hidden, *output[1:]])
    return hidden


# Where the attention and feed-forward sub-layers of a block write their output, before the residual addition
# (houlsby placement). Paths are relative to the block; the first layout whose two modules both exist wins.
SUBLAYER_LAYOUTS: tuple[tuple[str, str, str], ...] = (
    ("Llama/Gemma/Qwen/Mistral-like", "self_attn", "mlp"),
    ("BERT-like (BERT, MiniLM, RoBERTa)", "attention.output.dense", "output.dense"),
)


def find_sublayers(layer: nn.Module, model: nn.Module | None = None) -> dict[str, nn.Module]:
    """``{"attn": module, "ffn": module}``: the modules whose outputs are a block's attention and feed-forward
    results before they join the residual stream; a PeftError naming the classes where no layout fits."""
    modules = dict(layer.named_modules())
    for _, attn, ffn in SUBLAYER_LAYOUTS:
        if attn in modules and ffn in modules:
            return {"attn": modules[attn], "ffn": modules[ffn]}
    where = f" in {type(model).__name__}" if model is not None else ""
    known = "; ".join(f"{name}: {attn} + {ffn}" for name, attn, ffn in SUBLAYER_LAYOUTS)
    raise PeftError(f"placement=houlsby: cannot find the attention and feed-forward sub-layers of "
                    f"{type(layer).__name__}{where} (known layouts: {known}); use placement=block")
