"""Corpus-Invariant Tuning (CIT): the reader may not get better at generating the corpus than it was.

    L = L_QA + λ · mean_d max(0, ℓ0(d) - ℓθ(d) - m)

over the top-k passages d fed to the reader. ℓθ(d) is the reader's per-token NLL of d under its
denoising objective (`reader.passage_nll`: span corruption for seq2seq readers, next-token NLL for
decoder-only ones); ℓ0(d) is the same under the frozen initial reader. The corruption mask is seeded
by the passage key, so ℓ0(d) is a fixed number per passage: `ReferenceNLL` computes it once with a
frozen copy of the initial reader, keeps it in memory and in the run folder (`cit_reference.json`),
and never runs the frozen reader twice for the same passage. The cache is keyed by content, not by
name: a saved ℓ0 is reused only for the same objective and the same initial weights (a sha256 of the
initial reader's tensors), and only for a passage whose key *and* text (a digest of title and text) match,
so another base model, or a corpus update that keeps the passage ids, recomputes it.

ℓθ is computed with dropout off (the reference is too), so the hinge compares like with like, and the
QA loss sees exactly the randomness it would see without CIT: with λ = 0 training is plain training
(ℓθ is then computed without a graph, for the logs only).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from readers.base import BaseReader, ReaderPassage

log = logging.getLogger(__name__)

REFERENCE_FILE = "cit_reference.json"


@dataclass
class CITConfig:
    weight: float = 0.0   # λ
    margin: float = 0.0   # m


def cit_penalty(nll_theta: torch.Tensor, nll_ref: torch.Tensor, margin: float) -> torch.Tensor:
    """mean_d max(0, ℓ0(d) - ℓθ(d) - m); zero (with zero gradient) while ℓθ ≥ ℓ0 - m."""
    if nll_theta.numel() == 0:
        return nll_theta.sum()
    return torch.relu(nll_ref.to(nll_theta) - nll_theta - margin).mean()


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


class ReferenceNLL:
    """ℓ0 per passage: computed once by a frozen copy of the initial reader, cached in memory and on disk.

    The cache holds {"signature": objective + weights fingerprint of the initial reader, "nll": {key: ℓ0},
    "text": {key: digest of title and text}}; a saved value is used only under the same signature and for the
    same passage text."""

    def __init__(self, reader: BaseReader, path: str | Path | None = None, batch_size: int = 16) -> None:
        self.signature = {**reader.objective_signature(), "weights": weights_fingerprint(reader.model)}
        self.path = Path(path) if path is not None else None
        self.batch_size = batch_size
        self.values: dict[str, float] = {}
        self.texts: dict[str, str] = {}   # key -> passage_digest of the passage its value was computed for
        self.frozen_calls = 0  # passages the frozen reader has scored (each at most once)
        if self.path is not None and self.path.exists():
            self._load(self.path)
        self._frozen = copy.deepcopy(reader)
        self._frozen.eval()
        for p in self._frozen.parameters():
            p.requires_grad_(False)

    def _load(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            nll, texts = saved["nll"], saved.get("text") or {}
            values = {str(k): float(v) for k, v in nll.items()}
            texts = {str(k): str(v) for k, v in texts.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s cannot be read (%s); recomputing ℓ0", path, exc)
            return
        if saved.get("signature") != self.signature:
            log.warning("%s was computed for another objective or other initial weights; recomputing ℓ0", path)
            return
        self.values = {k: v for k, v in values.items() if k in texts}
        self.texts = {k: texts[k] for k in self.values}

    def __call__(self, passages: Sequence[ReaderPassage]) -> torch.Tensor:
        digests = [passage_digest(p) for p in passages]
        missing = list({p.key: p for p, d in zip(passages, digests)
                        if p.key not in self.values or self.texts.get(p.key) != d}.values())
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            with torch.no_grad():
                nll = self._frozen.passage_nll(chunk)
            self.frozen_calls += len(chunk)
            self.values.update({p.key: float(v) for p, v in zip(chunk, nll.tolist())})
            self.texts.update({p.key: passage_digest(p) for p in chunk})
        return torch.tensor([self.values[p.key] for p in passages], dtype=torch.float32)

    def save(self, path: str | Path | None = None) -> None:
        from core.io import write_json
        target = Path(path) if path is not None else self.path
        if target is not None:
            write_json(target, {"signature": self.signature, "nll": self.values, "text": self.texts})


def unique_passages(passages_per_question: Sequence[Sequence[ReaderPassage]]) -> list[ReaderPassage]:
    return list({p.key: p for ps in passages_per_question for p in ps}.values())


class CITObjective:
    """Loss function for one batch: QA loss plus the CIT hinge, with the logs the curves plot."""

    def __init__(self, reader: BaseReader, reference: ReferenceNLL, config: CITConfig) -> None:
        self.reader, self.reference, self.config = reader, reference, config

    def passage_terms(self, passages: Sequence[ReaderPassage]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℓθ, ℓ0) per passage; ℓθ with dropout off, with a graph only when λ > 0."""
        model = self.reader.model
        was_training = model.training
        model.eval()
        try:
            with torch.set_grad_enabled(self.config.weight > 0 and torch.is_grad_enabled()):
                nll_theta = self.reader.passage_nll(passages)
        finally:
            model.train(was_training)
        return nll_theta, self.reference(passages).to(nll_theta.device)

    def __call__(self, questions: Sequence[str], passages_per_question: Sequence[Sequence[ReaderPassage]],
                 answers: Sequence[str]) -> tuple[torch.Tensor, dict[str, float]]:
        loss_qa = self.reader.qa_loss(questions, passages_per_question, answers)
        passages = unique_passages(passages_per_question)
        if not passages:
            return loss_qa, {"loss_qa": float(loss_qa.detach()), "loss_cit": 0.0}
        nll_theta, nll_ref = self.passage_terms(passages)
        loss_cit = cit_penalty(nll_theta, nll_ref, self.config.margin)
        loss = loss_qa + self.config.weight * loss_cit if self.config.weight > 0 else loss_qa
        theta, ref = nll_theta.detach(), nll_ref.detach()
        logs: dict[str, Any] = {
            "loss_qa": float(loss_qa.detach()), "loss_cit": float(loss_cit.detach()),
            "nll_theta": float(theta.mean()), "nll_ref": float(ref.mean()),
            "nll_ratio": float((theta / ref.clamp(min=1e-6)).mean()),
            "cit_active": float(((ref - theta - self.config.margin) > 0).float().mean()),
        }
        return loss, logs
