"""``iaa``: connected bottleneck adapters whose low-rank states form a chain across layers.

For layer l with frozen output h_l (width d) and bottleneck r::

    z_l = act(D_l h_l + C_l z_{l-1}),   h_l <- h_l + U_l z_l,   z_0 = 0

D_l: d->r, C_l: r->r initialised to the identity, U_l: r->d initialised to zero, so the adapted
model starts exactly at the pretrained one. The chain z_1 -> ... -> z_L is a pathway by which
the gradient reaches every adapter without crossing the frozen layers.

Options (fields of ``BottleneckConfig`` / ``IAAConfig``; defaults reproduce the method as first written,
except ``first_c``):

* ``placement``: ``block`` hooks one adapter after each block's output; ``houlsby`` hooks two per layer,
  after the attention sub-layer's output and after the feed-forward's output, both before the residual
  addition (Houlsby et al. 2019); the chain runs through them in order (attn_1, ffn_1, attn_2, ...).
* ``init``: ``zero`` (U = 0) starts exactly at the pretrained model, but then z_l feeds nothing at step 0,
  so the gradients of every D and C are exactly zero on the first step (only U learns, and D/C start
  moving once U has grown). ``small`` draws U from N(0, init_std^2): D and C get gradient at step 0, and the
  model starts near (within O(init_std)), not at, the pretrained one.
* ``first_c`` (iaa only): the first adapter of a stack has no z_{l-1}, so with z_0 = 0 its C never acts.
  ``drop`` (default) gives it no C at all (it is not counted as trainable); ``use`` feeds the chain a real
  z_0 = act(D_0 h_0), where h_0 is the first block's input (the embeddings) and D_0 an extra d->r map, so
  C_1 carries the embeddings into the chain. Checkpoints saved before this option existed carry that
  never-used C_1; ``legacy_weights`` drops it on loading (exactly: it never took part in any output).

Implementation: each adapted module gets a forward hook that rewrites its hidden output, and the
adapters live on the layers (``layer.peft_adapter``: one ``BottleneckAdapter`` for ``block``, a
ModuleDict ``{"attn", "ffn"}`` for ``houlsby``). The adapters of one stack share a ``ChainState``; the
module that owns the stack and the stack's first layer reset it on entry, the last layer and the owner
clear it on exit (the layer hooks fire even when a caller runs the owner's ``forward`` directly, as
sentence-transformers 5+ does for the folders it saves), so every call of a stack (each
encoder pass, each incremental decoder step in ``generate()``) starts its own chain. Encoder and decoder
stacks get separate chains. All maps act per position, so a decoder step with a KV cache computes exactly
what a full teacher-forced pass computes for that position.
Gradient checkpointing works with ``block``: transformers (5.x) checkpoints a layer's `forward`, so its
hooks (the adapter) run once, outside the recomputed part, and the chain sees each layer once per pass.
With ``houlsby`` the hooks sit inside the layer and are recomputed: the scattered ``adapter`` is fine
there (it has no state), ``iaa`` refuses with a PeftError.

``adapter`` (the scattered ablation) reuses this module with the chain cut (no C at all).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from core.peft.config import PeftError, PeftMethodConfig
from core.peft.layers import find_layer_stacks, find_sublayers, hidden_of, with_hidden

log = logging.getLogger(__name__)

ADAPTER_ATTR = "peft_adapter"
PLACEMENTS = ("block", "houlsby")
INITS = ("zero", "small")
FIRST_C = ("drop", "use")


@dataclass
class BottleneckConfig(PeftMethodConfig):
    """Fields shared by the connected (``iaa``) and scattered (``adapter``) bottlenecks."""

    rank_field = "r"

    r: int = field(default=32, metadata={"help": "Bottleneck width r of every adapter (1..hidden size)."})
    activation: str = field(default="gelu", metadata={
        "help": "Nonlinearity applied to the bottleneck state; any key of transformers' ACT2FN."})
    placement: str = field(default="block", metadata={
        "choices": PLACEMENTS,
        "help": "block: one adapter after each transformer block's output; houlsby: two per layer, after the "
                "attention sub-layer's output and after the feed-forward's output, inside the residual "
                "(Houlsby et al. 2019; iaa chains through both in order)."})
    init: str = field(default="zero", metadata={
        "choices": INITS,
        "help": "zero: U = 0, the model starts exactly at the pretrained one but D and C get no gradient "
                "on the first step; small: U ~ N(0, init_std^2), D and C learn from step 0 and the model "
                "starts near, not at, the pretrained one."})
    init_std: float = field(default=1e-3, metadata={
        "help": "Standard deviation of U with init=small (ignored with init=zero)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ACT2FN:
            raise PeftError(f"unknown activation {self.activation!r}; allowed: {sorted(ACT2FN)}")
        for name, allowed in (("placement", PLACEMENTS), ("init", INITS)):
            if getattr(self, name) not in allowed:
                raise PeftError(f"{type(self).__name__}.{name}={getattr(self, name)!r}; allowed: {list(allowed)}")
        std = self.init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std <= 0:
            raise PeftError(f"{type(self).__name__}.init_std must be a positive finite number, got {std!r}")


@dataclass
class IAAConfig(BottleneckConfig):
    """Connected adapters: z_l = act(D_l h_l + C_l z_{l-1}), C_l initialised to the identity."""

    first_c: str = field(default="drop", metadata={
        "choices": FIRST_C,
        "help": "drop: the first adapter of a stack has no C (with z_0 = 0 it would never act, so it is not "
                "trained or counted); use: z_0 = act(D_0 h_0) from the first block's input (an extra d x r "
                "map D_0), so the first C carries the embeddings into the chain."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.first_c not in FIRST_C:
            raise PeftError(f"IAAConfig.first_c={self.first_c!r}; allowed: {list(FIRST_C)}")

    def legacy_weights(self, weights: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Checkpoints from before ``first_c`` hold a C for the first adapter of each stack that never acted
        (z_0 = 0): with first_c=drop the model has no such C, and that weight is dropped, exactly."""
        unused = [n for n in weights if n.endswith(".chain.weight") and n not in params
                  and n[:-len("chain.weight")] + "down.weight" in params]
        if unused:
            log.info("iaa: ignoring %d saved C matrix(es) of first adapters that never acted (z_0 = 0; saved "
                     "before the first_c option): %s", len(unused), ", ".join(unused))
        return {n: w for n, w in weights.items() if n not in unused}


class ChainState:
    """z_{l-1} of one layer stack during one call of that stack; never carried across calls."""

    def __init__(self, houlsby: bool = False) -> None:
        self.z: torch.Tensor | None = None
        self.active = False
        self.houlsby = houlsby

    def start(self, module: nn.Module, args: Any) -> None:
        self.z, self.active = None, True

    def stop(self, module: nn.Module, args: Any, output: Any) -> None:
        self.z, self.active = None, False

    def previous(self, like: torch.Tensor) -> torch.Tensor | None:
        """z_{l-1}, checked to belong to this pass (same batch and positions as ``like``)."""
        if not self.active:
            if self.houlsby:
                raise PeftError(
                    "iaa with placement=houlsby: an adapter ran outside its stack's forward (gradient checkpointing "
                    "recomputes the inside of each layer, where houlsby adapters sit); disable gradient "
                    "checkpointing or use placement=block.")
            raise PeftError(
                "iaa: a layer ran outside its stack's forward (gradient-checkpoint recomputation that re-runs "
                "module hooks: transformers older than 5 does); the chain state is undefined there. Upgrade "
                "transformers or disable gradient checkpointing with iaa.")
        if self.z is not None and self.z.shape != like.shape:
            raise PeftError(f"iaa: chain state shape {tuple(self.z.shape)} does not match this layer's "
                            f"{tuple(like.shape)}; layers of one stack must see the same positions")
        return self.z


class BottleneckAdapter(nn.Module):
    """D (down), optional C (chain), optional D_0 (entry) and U (up) for one adapted module.

    ``after_layer`` is its forward hook; ``before_stack`` (first adapter with first_c=use) is a forward
    pre-hook of the stack's first block that starts the chain at z_0 = act(D_0 h_0).
    """

    def __init__(self, width: int, r: int, activation: str, state: ChainState | None,
                 like: torch.Tensor, chain: bool | None = None, entry: bool = False,
                 init: str = "zero", init_std: float = 1e-3) -> None:
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        chain = state is not None if chain is None else chain
        self.down = nn.Linear(width, r, bias=False, **kw)
        self.chain = nn.Linear(r, r, bias=False, **kw) if chain else None
        self.entry = nn.Linear(width, r, bias=False, **kw) if entry else None
        self.up = nn.Linear(r, width, bias=False, **kw)
        self.act = ACT2FN[activation]
        self._state = state  # plain object shared by the stack's adapters, not a submodule
        self.enabled = True  # False: the hook leaves the block's output alone (core.peft.disable)
        if self.chain is not None:
            nn.init.eye_(self.chain.weight)
        if init == "small":
            nn.init.normal_(self.up.weight, mean=0.0, std=init_std)
        else:
            nn.init.zeros_(self.up.weight)

    def before_stack(self, layer: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if not self.enabled or self._state is None or self.entry is None:
            return
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise PeftError(f"iaa first_c=use: cannot find the input hidden state of {type(layer).__name__}")
        self._state.previous(hidden)  # only checks that the stack's pass is under way
        self._state.z = self.act(self.entry(hidden))

    def after_layer(self, layer: nn.Module, args: Any, output: Any) -> Any:
        if not self.enabled:
            return output
        hidden = hidden_of(output)
        pre = self.down(hidden)
        if self._state is not None:
            z_prev = self._state.previous(pre)
            if z_prev is not None:
                if self.chain is None:
                    raise PeftError("iaa: an adapter without C received a chain state (first_c=drop gives only "
                                    "the first adapter of a stack no C)")
                pre = pre + self.chain(z_prev)
        z = self.act(pre)
        if self._state is not None:
            self._state.z = z
        return with_hidden(output, hidden + self.up(z))


def attach_bottlenecks(model: nn.Module, config: BottleneckConfig, connected: bool) -> nn.Module:
    """Freeze ``model`` and hook bottleneck adapters into every layer of every layer stack."""
    stacks = find_layer_stacks(model)
    if not stacks:
        raise PeftError(f"no transformer layer stack (ModuleList of blocks) found in {type(model).__name__}")
    houlsby = config.placement == "houlsby"
    first_c = getattr(config, "first_c", "drop")
    # Find every hook point before changing anything, so an unsupported model is refused untouched.
    targets = {stack.name: [find_sublayers(layer, model) if houlsby else {"block": layer} for layer in stack.layers]
               for stack in stacks}
    for stack in stacks:
        config.check_width(stack.width)
        if any(hasattr(layer, ADAPTER_ATTR) for layer in stack.layers):
            raise PeftError(f"layer stack '{stack.name}' already carries adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    for stack in stacks:
        state = ChainState(houlsby) if connected else None
        if state is not None:
            # The stack's owner and its first/last layers all bound the chain: sentence-transformers (5+) may
            # call the owner's `forward` directly, past its hooks, while the owner always calls its layers.
            stack.owner.register_forward_pre_hook(state.start)
            stack.owner.register_forward_hook(state.stop)
            stack.layers[0].register_forward_pre_hook(state.start)
        position = 0
        for layer, points in zip(stack.layers, targets[stack.name]):
            adapters = {}
            for key, module in points.items():
                first = position == 0
                adapter = BottleneckAdapter(
                    stack.width, config.r, config.activation, state, like=next(layer.parameters()),
                    chain=connected and (not first or first_c == "use"),
                    entry=connected and first and first_c == "use", init=config.init, init_std=config.init_std)
                module.register_forward_hook(adapter.after_layer)
                if adapter.entry is not None:
                    layer.register_forward_pre_hook(adapter.before_stack, with_kwargs=True)
                adapters[key] = adapter
                position += 1
            layer.add_module(ADAPTER_ATTR, adapters["block"] if not houlsby else nn.ModuleDict(adapters))
        if state is not None:
            stack.layers[-1].register_forward_hook(state.stop)  # after the last adapter's hook
    return model


def apply_iaa(model: nn.Module, config: IAAConfig) -> nn.Module:
    return attach_bottlenecks(model, config, connected=True)
