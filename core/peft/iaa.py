"""``iaa``: connected bottleneck adapters whose low-rank states form a chain across layers.

For layer l with frozen output h_l (width d) and bottleneck r::

    z_l = act(D_l h_l + C_l z_{l-1}),   h_l <- h_l + U_l z_l,   z_0 = 0

D_l: d->r, C_l: r->r initialised to the identity, U_l: r->d initialised to zero, so the adapted
model starts exactly at the pretrained one. The chain z_1 -> ... -> z_L is a pathway by which
the gradient reaches every adapter without crossing the frozen layers.

Implementation: each block gets a ``BottleneckAdapter`` child module and a forward hook that
rewrites the block's hidden output. The blocks of one stack share a ``ChainState``; the module
that owns the stack resets it on entry and clears it on exit, so every call of a stack (each
encoder pass, each incremental decoder step in ``generate()``) starts its own chain at z_0 = 0.
Encoder and decoder stacks get separate chains. All maps act per position, so a decoder step
with a KV cache computes exactly what a full teacher-forced pass computes for that position.
Gradient checkpointing works: transformers (5.x) checkpoints a layer's `forward`, so its hooks (the
adapter) run once, outside the recomputed part, and the chain sees each layer once per pass.

``adapter`` (the scattered ablation) reuses this module with the chain cut (no C at all).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from core.peft.config import PeftError, PeftMethodConfig
from core.peft.layers import find_layer_stacks, hidden_of, with_hidden

ADAPTER_ATTR = "peft_adapter"


@dataclass
class BottleneckConfig(PeftMethodConfig):
    """Fields shared by the connected (``iaa``) and scattered (``adapter``) bottlenecks."""

    rank_field = "r"

    r: int = field(default=32, metadata={"help": "Bottleneck width r of every adapter (1..hidden size)."})
    activation: str = field(default="gelu", metadata={
        "help": "Nonlinearity applied to the bottleneck state; any key of transformers' ACT2FN."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ACT2FN:
            raise PeftError(f"unknown activation {self.activation!r}; allowed: {sorted(ACT2FN)}")


@dataclass
class IAAConfig(BottleneckConfig):
    """Connected adapters: z_l = act(D_l h_l + C_l z_{l-1}), C_l initialised to the identity."""


class ChainState:
    """z_{l-1} of one layer stack during one call of that stack; never carried across calls."""

    def __init__(self) -> None:
        self.z: torch.Tensor | None = None
        self.active = False

    def start(self, module: nn.Module, args: Any) -> None:
        self.z, self.active = None, True

    def stop(self, module: nn.Module, args: Any, output: Any) -> None:
        self.z, self.active = None, False

    def previous(self, like: torch.Tensor) -> torch.Tensor | None:
        """z_{l-1}, checked to belong to this pass (same batch and positions as ``like``)."""
        if not self.active:
            raise PeftError(
                "iaa: a layer ran outside its stack's forward (gradient-checkpoint recomputation that re-runs "
                "module hooks: transformers older than 5 does); the chain state is undefined there. Upgrade "
                "transformers or disable gradient checkpointing with iaa.")
        if self.z is not None and self.z.shape != like.shape:
            raise PeftError(f"iaa: chain state shape {tuple(self.z.shape)} does not match this layer's "
                            f"{tuple(like.shape)}; layers of one stack must see the same positions")
        return self.z


class BottleneckAdapter(nn.Module):
    """D (down), optional C (chain) and U (up) for one block; ``after_layer`` is its forward hook."""

    def __init__(self, width: int, r: int, activation: str, state: ChainState | None,
                 like: torch.Tensor) -> None:
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.down = nn.Linear(width, r, bias=False, **kw)
        self.chain = nn.Linear(r, r, bias=False, **kw) if state is not None else None
        self.up = nn.Linear(r, width, bias=False, **kw)
        self.act = ACT2FN[activation]
        self._state = state  # plain object shared by the stack's adapters, not a submodule
        self.enabled = True  # False: the hook leaves the block's output alone (core.peft.disable)
        if self.chain is not None:
            nn.init.eye_(self.chain.weight)
        nn.init.zeros_(self.up.weight)

    def after_layer(self, layer: nn.Module, args: Any, output: Any) -> Any:
        if not self.enabled:
            return output
        hidden = hidden_of(output)
        pre = self.down(hidden)
        if self._state is not None:
            z_prev = self._state.previous(pre)
            if z_prev is not None:
                pre = pre + self.chain(z_prev)
        z = self.act(pre)
        if self._state is not None:
            self._state.z = z
        return with_hidden(output, hidden + self.up(z))


def attach_bottlenecks(model: nn.Module, config: BottleneckConfig, connected: bool) -> nn.Module:
    """Freeze ``model`` and hook a bottleneck adapter after every block of every layer stack."""
    stacks = find_layer_stacks(model)
    if not stacks:
        raise PeftError(f"no transformer layer stack (ModuleList of blocks) found in {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for stack in stacks:
        config.check_width(stack.width)
        state = ChainState() if connected else None
        if state is not None:
            stack.owner.register_forward_pre_hook(state.start)
            stack.owner.register_forward_hook(state.stop)
        for layer in stack.layers:
            if hasattr(layer, ADAPTER_ATTR):
                raise PeftError(f"layer stack '{stack.name}' already carries adapters")
            adapter = BottleneckAdapter(stack.width, config.r, config.activation, state,
                                        like=next(layer.parameters()))
            layer.add_module(ADAPTER_ATTR, adapter)
            layer.register_forward_hook(adapter.after_layer)
    return model


def apply_iaa(model: nn.Module, config: IAAConfig) -> nn.Module:
    return attach_bottlenecks(model, config, connected=True)
