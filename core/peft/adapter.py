"""``adapter``: the scattered ablation of ``iaa`` - the same bottlenecks with the chain cut.

z_l = act(D_l h_l), h_l <- h_l + U_l z_l. There is no C parameter at all, so each adapter is
reached by the gradient only through the frozen layers above it; the parameter count is that of
``iaa`` (first_c=drop) minus (A-1)*r*r, A adapters a stack (L with placement=block, 2L with houlsby).
``placement`` and ``init`` are the same options as ``iaa``'s (BottleneckConfig).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from core.peft.iaa import BottleneckConfig, attach_bottlenecks


@dataclass
class AdapterConfig(BottleneckConfig):
    """Independent per-layer bottleneck adapters (no cross-layer chain)."""


def apply_adapter(model: nn.Module, config: AdapterConfig) -> nn.Module:
    return attach_bottlenecks(model, config, connected=False)
