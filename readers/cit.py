"""Corpus-Invariant Tuning (CIT): the reader may not get better at generating the corpus than it was.

    L = L_QA + λ · mean_d max(0, (1 - r) · ℓ0(d) - m - ℓθ(d))

over the top-k passages d fed to the reader. ℓθ(d) is the reader's NLL of d under the CIT proxy
(`reader.passage_nll`, chosen by `ReaderConfig.cit_proxy`): for decoder-only readers by default the
masked-salient-span NLL (the passage's years, numbers and names blanked, only their tokens scored; see
readers/causal.py), or the whole-passage NLL (`passage`: next-token for decoder-only readers, span corruption
for seq2seq ones). ℓ0(d) is the same under the initial reader. The margin is absolute (m, in nats per
token, default 0: any gain over the reference is penalised) and/or relative (r, default 0: with r = 0.05
the penalty fires only once the reader's likelihood of d is more than 5 % better, i.e. ℓθ < 0.95 · ℓ0).

The reference without a second copy of the weights (`ReferenceNLL`):
- a reader with switchable PEFT adapters (lora, iaa, adapter, prefix) scores ℓ0 with the adapters off
  (`core.peft.adapters_disabled`), when a passage is first met;
- any other reader (full tuning, bitfit) scores ℓ0 with its own weights *before* training moves them:
  the trainer precomputes ℓ0 of every training passage (`precompute`), then `freeze()`s the reference,
  after which a passage without a value is an error rather than a wrong number.
Values are kept in memory and in the run folder (`cit_reference.json`), keyed by passage key and checked
against a digest of its title and text. The cache is valid only for the same signature (reader kind,
proxy, objective, passage length, and a sha256 of the initial weights): a cache made for another model or
proxy is refused with an error naming both. A passage whose proxy has no value (the span proxy on a
passage without a salient span) is NaN: skipped by the hinge and counted (`CITObjective.skipped`).

ℓθ is computed with dropout off (the reference is too), so the hinge compares like with like, and the
QA loss sees exactly the randomness it would see without CIT. With λ = 0 nothing of CIT is computed,
cached or logged: the objective is the QA loss alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import RagError
from readers.base import BaseReader, ReaderPassage

log = logging.getLogger(__name__)

REFERENCE_FILE = "cit_reference.json"


def _number(flag: str, value: Any, low: float | None = None, below: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RagError(f"{flag}: expected a finite number, got {value!r}")
    if low is not None and value < low:
        raise RagError(f"{flag}: must be at least {low:g}, got {value!r}")
    if below is not None and value >= below:
        raise RagError(f"{flag}: must be less than {below:g}, got {value!r}")
    return float(value)


@dataclass
class CITConfig:
    weight: float = 0.0           # λ
    margin: float = 0.0           # m (nats per token)
    margin_relative: float = 0.0  # r: the hinge starts at (1 - r) · ℓ0 - m

    def __post_init__(self) -> None:
        self.weight = _number("--cit-weight", self.weight, low=0.0)
        self.margin = _number("--cit-margin", self.margin)
        self.margin_relative = _number("--cit-margin-relative", self.margin_relative, low=0.0, below=1.0)


def cit_penalty(nll_theta: torch.Tensor, nll_ref: torch.Tensor, margin: float, relative: float = 0.0) -> torch.Tensor:
    """mean_d max(0, (1 - r) ℓ0(d) - m - ℓθ(d)); zero (with zero gradient) while ℓθ ≥ (1 - r) ℓ0 - m."""
    if nll_theta.numel() == 0:
        return nll_theta.sum()
    return torch.relu((1.0 - relative) * nll_ref.to(nll_theta) - margin - nll_theta).mean()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the model's state dict (name, dtype, shape and bytes): the same number for the
    same weights wherever they were loaded from, another for any other weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return f"sha256:{digest.hexdigest()}"


def passage_digest(passage: ReaderPassage) -> str:
    """What ℓ0(d) reads of a passage besides its key: its title and text."""
    return hashlib.sha256(f"{passage.title}\0{passage.text}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


def describe_signature(signature: dict[str, Any]) -> str:
    """One line naming what a cached ℓ0 was computed for."""
    weights = str(signature.get("weights", "?"))
    return (f"{signature.get('kind', '?')} reader, proxy {signature.get('proxy', '?')} "
            f"({signature.get('objective', '?')}), {signature.get('max_passage_tokens', '?')} tokens/passage, "
            f"weights {weights[:19]}")


class ReferenceNLL:
    """ℓ0 per passage, scored by the reader itself with its adapters off or before training (see the module doc),
    cached in memory and on disk ({"signature", "nll": {key: ℓ0 or null}, "text": {key: digest}})."""

    def __init__(self, reader: BaseReader, path: str | Path | None = None, batch_size: int = 16) -> None:
        self.reader = reader
        self.signature = {**reader.objective_signature(), "weights": weights_fingerprint(reader.model)}
        self.path = Path(path) if path is not None else None
        self.batch_size = batch_size
        self.values: dict[str, float] = {}
        self.texts: dict[str, str] = {}   # key -> passage_digest of the passage its value was computed for
        self.frozen_calls = 0  # passages scored for the reference (each at most once)
        self.frozen = False    # True once the reader's own weights may have moved (training started)
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            nll, texts = saved["nll"], saved.get("text") or {}
            values = {str(k): float("nan") if v is None else float(v) for k, v in nll.items()}
            texts = {str(k): str(v) for k, v in texts.items()}
            signature = saved["signature"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s cannot be read (%s); recomputing ℓ0", path, exc)
            return
        if signature != self.signature:
            differ = sorted(k for k in set(signature) | set(self.signature) if signature.get(k) != self.signature.get(k))
            raise RagError(f"{path}: the cached CIT reference was computed for {describe_signature(signature)}, "
                           f"not for this run's {describe_signature(self.signature)} (differs in {', '.join(differ)}); "
                           "remove the file or train into another folder")
        self.values = {k: v for k, v in values.items() if k in texts}
        self.texts = {k: texts[k] for k in self.values}

    def freeze(self) -> None:
        """From now on the reader's own weights move: only switchable adapters may still score new passages."""
        self.frozen = True

    def _context(self, missing: Sequence[ReaderPassage]) -> contextlib.AbstractContextManager:
        from core.peft import adapters_disabled, can_disable_adapters

        model = self.reader.model
        if can_disable_adapters(model):
            return adapters_disabled(model)
        if self.frozen:
            raise RagError(f"CIT reference: ℓ0 of passage {missing[0].key!r} was not precomputed, and this reader "
                           "has no adapter to switch off (full tuning): precompute ℓ0 of every training passage "
                           "before training (ReferenceNLL.precompute)")
        return contextlib.nullcontext()

    def __call__(self, passages: Sequence[ReaderPassage]) -> torch.Tensor:
        digests = [passage_digest(p) for p in passages]
        missing = list({p.key: p for p, d in zip(passages, digests)
                        if p.key not in self.values or self.texts.get(p.key) != d}.values())
        if missing:
            model = self.reader.model
            was_training = model.training
            model.eval()
            try:
                for start in range(0, len(missing), self.batch_size):
                    chunk = missing[start:start + self.batch_size]
                    with torch.no_grad(), self._context(chunk):
                        nll = self.reader.passage_nll(chunk)
                    self.frozen_calls += len(chunk)
                    self.values.update({p.key: float(v) for p, v in zip(chunk, nll.tolist())})
                    self.texts.update({p.key: passage_digest(p) for p in chunk})
            finally:
                model.train(was_training)
        return torch.tensor([self.values[p.key] for p in passages], dtype=torch.float32)

    def precompute(self, passages: Sequence[ReaderPassage]) -> int:
        """Score every passage not yet cached (call before training); returns how many there are."""
        unique = list({p.key: p for p in passages}.values())
        self(unique)
        return len(unique)

    def save(self, path: str | Path | None = None) -> None:
        from core.io import write_json
        target = Path(path) if path is not None else self.path
        if target is not None:
            nll = {k: (None if math.isnan(v) else v) for k, v in self.values.items()}
            write_json(target, {"signature": self.signature, "nll": nll, "text": self.texts})


def unique_passages(passages_per_question: Sequence[Sequence[ReaderPassage]]) -> list[ReaderPassage]:
    return list({p.key: p for ps in passages_per_question for p in ps}.values())


class CITObjective:
    """Loss function for one batch: QA loss plus the CIT hinge, with the logs the curves plot.

    With λ = 0 it is the QA loss alone and logs only `loss_qa` (the reference may then be None). Passages
    whose proxy has no value (NaN: no salient span) are left out of the hinge; their keys are collected in
    `skipped`, and each step logs `cit_skipped` (how many of its passages were)."""

    def __init__(self, reader: BaseReader, reference: ReferenceNLL | None, config: CITConfig) -> None:
        self.reader, self.reference, self.config = reader, reference, config
        self.skipped: set[str] = set()
        if config.weight > 0 and reference is None:
            raise RagError("CIT with a weight > 0 needs a reference (ReferenceNLL)")

    def passage_terms(self, passages: Sequence[ReaderPassage]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℓθ, ℓ0) per passage; ℓθ with dropout off, with a graph when gradients are enabled. ℓ0 first: with
        switchable adapters it runs with them off, before any graph through them is built."""
        if self.reference is None:
            raise RagError("CIT reference is not available (λ = 0)")
        nll_ref = self.reference(passages)
        model = self.reader.model
        was_training = model.training
        model.eval()
        try:
            nll_theta = self.reader.passage_nll(passages)
        finally:
            model.train(was_training)
        return nll_theta, nll_ref.to(nll_theta.device)

    def __call__(self, questions: Sequence[str], passages_per_question: Sequence[Sequence[ReaderPassage]],
                 answers: Sequence[str]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.config.weight <= 0:
            loss_qa = self.reader.qa_loss(questions, passages_per_question, answers)
            return loss_qa, {"loss_qa": float(loss_qa.detach())}
        passages = unique_passages(passages_per_question)
        if self.reference is not None and passages:
            self.reference(passages)  # ℓ0 before the QA graph (adapters are switched off for it)
        loss_qa = self.reader.qa_loss(questions, passages_per_question, answers)
        if not passages:
            return loss_qa, {"loss_qa": float(loss_qa.detach()), "loss_cit": 0.0, "cit_active": 0.0}
        nll_theta, nll_ref = self.passage_terms(passages)
        ok = torch.isfinite(nll_theta.detach()) & torch.isfinite(nll_ref)
        self.skipped.update(p.key for p, good in zip(passages, ok.tolist()) if not good)
        theta_ok, ref_ok = nll_theta[ok], nll_ref[ok]
        cfg = self.config
        loss_cit = cit_penalty(theta_ok, ref_ok, cfg.margin, cfg.margin_relative)
        loss = loss_qa + cfg.weight * loss_cit
        logs: dict[str, float] = {"loss_qa": float(loss_qa.detach()), "loss_cit": float(loss_cit.detach()),
                                  "cit_skipped": float((~ok).sum())}
        if int(ok.sum()):
            theta, ref = theta_ok.detach(), ref_ok.detach()
            threshold = (1.0 - cfg.margin_relative) * ref - cfg.margin
            logs.update({"nll_theta": float(theta.mean()), "nll_ref": float(ref.mean()),
                         "nll_ratio": float((theta / ref.clamp(min=1e-6)).mean()),
                         "cit_active": float((threshold - theta > 0).float().mean())})
        else:
            logs["cit_active"] = 0.0
        return loss, logs
