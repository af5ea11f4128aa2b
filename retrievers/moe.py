"""Mixture-of-experts embedding heads over one shared (possibly PEFT-adapted) sentence encoder.

Each domain has an expert head on the pooled embedding h::

    e = normalise(h + W2 tanh(W1 h))        W2 initialised to zero

so an untrained mixture embeds exactly like the base model (after normalisation). Optionally
(``expert_ffn``) each expert also owns a copy of one middle layer's feed-forward block (BERT-style
``intermediate`` + ``output``), initialised from the pretrained weights, so again it starts at the base.

Routing:

* a row with a known domain (training examples, documents, queries whose domain is given) goes to
  that domain's expert;
* a row without one goes through the router, a linear classifier over the shared encoder's pooled
  embedding (input detached, so the router never pulls the encoder; scaled by sqrt(d) so it learns at
  the encoder's learning rate), trained alongside with
  cross-entropy to the domain label. The query embedding is the router-probability-weighted mixture
  of the expert heads (with ``expert_ffn``: the top-1 expert, since each expert changes the encoder
  pass itself). Such a query is searched against the union of all domains' documents.

``shared_head=True`` gives the single-head baseline with the same architecture: one head that every
domain uses.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import RagError

EXPERT_IDS = "expert_ids"  # per-row LongTensor in a features dict; -1 = unknown domain


@dataclass
class MoEConfig:
    domains: list[str]
    hidden: int = 64
    shared_head: bool = False
    expert_ffn: bool = False
    ffn_layer: int | None = None  # default: the middle layer

    def __post_init__(self) -> None:
        if not self.domains:
            raise RagError("mixture of experts: no domains (does the corpus have the domain field?)")
        if len(set(self.domains)) != len(self.domains):
            raise RagError(f"mixture of experts: duplicate domains in {self.domains}")
        if self.hidden <= 0:
            raise RagError(f"mixture of experts: head hidden size must be positive, got {self.hidden}")

    @property
    def n_experts(self) -> int:
        return 1 if self.shared_head else len(self.domains)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExpertHead(nn.Module):
    """pooled h -> h + dense2(tanh(dense1(h))); dense2 starts at zero (identity head)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense1 = nn.Linear(dim, hidden)
        self.dense2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.dense2.weight)
        nn.init.zeros_(self.dense2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.dense2(torch.tanh(self.dense1(h)))


class ExpertFFN(nn.Module):
    """Per-expert copies of one BERT-style layer's feed-forward block, routed per row by a hook.

    The hook on the original ``layer.output`` recomputes the block for every row routed to an expert
    (``self.ids[row] >= 0``) with that expert's copies; rows with -1 keep the shared block.
    """

    def __init__(self, layer: nn.Module, n_experts: int) -> None:
        super().__init__()
        if not (hasattr(layer, "intermediate") and hasattr(layer, "output")):
            raise RagError(f"expert FFNs need BERT-style layers (.intermediate and .output); "
                           f"{type(layer).__name__} has neither")
        self.intermediate = nn.ModuleList(copy.deepcopy(layer.intermediate) for _ in range(n_experts))
        self.output = nn.ModuleList(copy.deepcopy(layer.output) for _ in range(n_experts))
        for p in self.parameters():
            p.requires_grad_(True)
        self.ids: torch.Tensor | None = None
        layer.output.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if self.ids is None:
            return output
        attention_output = args[1] if len(args) > 1 else kwargs["input_tensor"]
        for e in sorted(set(self.ids.tolist()) - {-1}):
            rows = (self.ids == e).nonzero(as_tuple=True)[0]
            x = attention_output.index_select(0, rows)
            output = output.index_put((rows,), self.output[e](self.intermediate[e](x), x))
        return output

    @contextmanager
    def routed(self, ids: torch.Tensor | None) -> Iterator[None]:
        self.ids = ids
        try:
            yield
        finally:
            self.ids = None


def _middle_layer(st: nn.Module, index: int | None) -> nn.Module:
    from core.peft import find_layer_stacks
    from core.peft.wrapping import inner_model

    stacks = find_layer_stacks(inner_model(st))
    if not stacks:
        raise RagError("expert FFNs: no transformer layer stack found in the encoder")
    layers = stacks[0].layers
    index = len(layers) // 2 if index is None else index
    if not 0 <= index < len(layers):
        raise RagError(f"expert FFN layer {index} out of range 0..{len(layers) - 1}")
    return layers[index]


class MoEEncoder(nn.Module):
    """A SentenceTransformer plus expert heads and a router; ``forward`` and ``encode`` like an ST.

    ``forward(features)`` reads an optional ``expert_ids`` row tensor (domain index, -1 unknown) and
    returns ``sentence_embedding`` (normalised), ``router_logits`` and ``shared_embedding``.
    ``encode(texts, domains=None)`` routes by domain name where given (DenseEncoder passes the
    passage rows' domains when building an index).
    """

    wants_domains = True

    def __init__(self, st: nn.Module, config: MoEConfig) -> None:
        super().__init__()
        self.st = st
        self.config = config
        dim = self.dim
        self.experts = nn.ModuleList(ExpertHead(dim, config.hidden) for _ in range(config.n_experts))
        self.router = nn.Linear(dim, len(config.domains))
        # The pooled embedding is unit-norm (entries ~ 1/sqrt(d)); scaling it to unit-variance entries lets the
        # router learn at the encoder's learning rate (unscaled, its logits barely move in a short run).
        self.router_scale = float(dim) ** 0.5
        self.ffn = (ExpertFFN(_middle_layer(st, config.ffn_layer), config.n_experts)
                    if config.expert_ffn else None)
        self._domain_index = {d: i for i, d in enumerate(config.domains)}
        to_expert = torch.zeros(len(config.domains), config.n_experts)
        for i in range(len(config.domains)):
            to_expert[i, 0 if config.shared_head else i] = 1.0
        self.register_buffer("domain_to_expert", to_expert, persistent=False)

    # ------------------------------------------------------------------ ids
    @property
    def dim(self) -> int:
        getter = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        return int(getter())

    def get_embedding_dimension(self) -> int:
        return self.dim

    def domain_ids(self, domains: Sequence[str | None]) -> torch.Tensor:
        """Domain index per row (-1 for no domain or one the mixture was not built with)."""
        return torch.tensor([self._domain_index.get(d, -1) if d is not None else -1 for d in domains],
                            dtype=torch.long)

    def expert_of_domain(self, ids: torch.Tensor) -> torch.Tensor:
        if self.config.shared_head:
            return torch.where(ids >= 0, torch.zeros_like(ids), ids)
        return ids

    # ------------------------------------------------------------------ forward
    def _shared(self, feats: dict[str, Any], ids: torch.Tensor | None) -> torch.Tensor:
        if self.ffn is None:
            return self.st(feats)["sentence_embedding"]
        with self.ffn.routed(ids):
            return self.st(dict(feats))["sentence_embedding"]

    def forward(self, features: dict[str, Any]) -> dict[str, torch.Tensor]:
        domain_ids = features.get(EXPERT_IDS)
        feats = {k: v for k, v in features.items() if k != EXPERT_IDS}
        if self.ffn is None:
            h = self._shared(feats, None)
            logits = self.router(h.detach() * self.router_scale)
        else:
            # The router always reads the shared-FFN pass (no gradient to the encoder), in training as in use.
            logits = self.router(self._router_input(feats) * self.router_scale)
            ids = domain_ids if domain_ids is not None else torch.full((len(logits),), -1, dtype=torch.long)
            ids = torch.where(ids.to(logits.device) >= 0, ids.to(logits.device), logits.argmax(dim=1))
            h = self._shared(feats, self.expert_of_domain(ids))
            domain_ids = ids
        heads = torch.stack([expert(h) for expert in self.experts], dim=1)  # (B, E, d)
        weights = torch.softmax(logits, dim=1) @ self.domain_to_expert.to(logits.dtype)  # (B, E)
        if domain_ids is not None:
            known = domain_ids >= 0
            onehot = torch.zeros_like(weights)
            experts = self.expert_of_domain(domain_ids.clamp(min=0)).to(weights.device)
            onehot.scatter_(1, experts.unsqueeze(1), 1.0)
            weights = torch.where(known.to(weights.device).unsqueeze(1), onehot, weights)
        emb = (weights.unsqueeze(2) * heads).sum(dim=1)
        return {"sentence_embedding": nn.functional.normalize(emb, dim=-1), "router_logits": logits,
                "shared_embedding": h}

    def _router_input(self, feats: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return self._shared(dict(feats), None)

    # ------------------------------------------------------------------ encode
    def preprocess(self, texts: Sequence[str]) -> dict[str, Any]:
        return self.st.preprocess(list(texts))

    def encode(self, sentences: Sequence[str], batch_size: int = 32, convert_to_numpy: bool = True,
               normalize_embeddings: bool = True, show_progress_bar: bool = False,
               domains: Sequence[str | None] | None = None, **_: Any) -> np.ndarray:
        texts = list(sentences)
        if domains is not None and len(domains) != len(texts):
            raise RagError(f"encode: {len(domains)} domains for {len(texts)} texts")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for start in range(0, len(texts), batch_size):
                    feats = self.preprocess(texts[start:start + batch_size])
                    feats = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in feats.items()}
                    if domains is not None:
                        feats[EXPERT_IDS] = self.domain_ids(domains[start:start + batch_size]).to(device)
                    out.append(self(feats)["sentence_embedding"].float().cpu())
        finally:
            self.train(was_training)
        emb = torch.cat(out) if out else torch.zeros(0, self.dim)
        return emb.numpy() if convert_to_numpy else emb

    # ------------------------------------------------------------------ state
    def moe_state_dict(self) -> dict[str, torch.Tensor]:
        """Heads, router and expert FFNs (everything but the shared encoder)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("st.")}

    def load_moe_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.moe_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise RagError(f"mixture-of-experts weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        self.load_state_dict(state, strict=False)


def router_loss(logits: torch.Tensor, domain_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the router against the domain label (rows without one ignored), and accuracy."""
    known = domain_ids >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0, float("nan")
    loss = nn.functional.cross_entropy(logits[known], domain_ids[known].to(logits.device))
    acc = float((logits[known].argmax(dim=1).cpu() == domain_ids[known].cpu()).float().mean())
    return loss, acc
