"""Running a PEFT-adapted model as its base model, without a second copy of the weights.

``adapters_disabled(model)`` is a context manager under which the model computes what the base model
computes: peft's LoRA layers are switched off (``enable_adapters(False)``), a peft ``PeftModel`` (prefix
tuning) uses its own ``disable_adapter()``, and the toolkit's bottleneck adapters (``iaa``, ``adapter``)
are skipped by their hooks. Every parameter's ``requires_grad`` is restored on exit. Methods that change
base weights in place (``full``, ``bitfit``) cannot be switched off: ``can_disable_adapters`` says False
for them, and ``adapters_disabled`` refuses them with a PeftError.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from core.peft.api import _TAG
from core.peft.config import PeftError
from core.peft.wrapping import inner_model

_SWITCHABLE = {"lora", "iaa", "adapter", "prefix"}


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _bottlenecks(model: nn.Module) -> list[nn.Module]:
    from core.peft.iaa import BottleneckAdapter
    return [m for m in model.modules() if isinstance(m, BottleneckAdapter)]


def can_disable_adapters(model: nn.Module) -> bool:
    """True when ``model`` carries a method that ``adapters_disabled`` can switch off (lora, iaa, adapter, prefix)."""
    name = getattr(model, _TAG, (None, None))[0]
    if name is not None:
        return name in _SWITCHABLE
    inner = inner_model(model)
    return hasattr(inner, "disable_adapter") or bool(_tuner_layers(inner)) or bool(_bottlenecks(inner))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` computes its base model's outputs (see the module doc)."""
    if not can_disable_adapters(model):
        name = getattr(model, _TAG, (None, None))[0] or "no PEFT method"
        raise PeftError(f"cannot disable the adapters of a model with {name}: it has no switchable adapter "
                        "(full and bitfit change the base weights in place)")
    inner = inner_model(model)
    grads = {id(p): p.requires_grad for p in inner.parameters()}
    params = list(inner.parameters())
    if hasattr(inner, "disable_adapter") and callable(inner.disable_adapter):
        cm: contextlib.AbstractContextManager = inner.disable_adapter()
    else:
        cm = contextlib.nullcontext()
    layers, bottlenecks = _tuner_layers(inner), _bottlenecks(inner)
    try:
        with cm:
            for layer in layers:
                layer.enable_adapters(False)
            for b in bottlenecks:
                b.enabled = False
            yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for b in bottlenecks:
            b.enabled = True
        for p in params:
            p.requires_grad_(grads[id(p)])
