"""The Reader protocol, the shared reader machinery, and loading/saving readers.

A reader turns (question, retrieved passages) into an answer string, gives the QA loss used to train
it, and gives `passage_nll`: its per-token negative log-likelihood of each passage under a denoising
objective (what CIT constrains, see readers/cit.py). Two kinds exist:

- `fid`: Fusion-in-Decoder over any HF seq2seq model (default: the warm-started MiniLM bert2bert);
- `causal`: a decoder-only model with the passages in the prompt (default: Gemma-3-270M).

Bad input never crashes a reader: passages longer than the model allows are truncated (counted in
`reader.stats["truncated_passages"]`), a question without passages is answered from the question
alone (counted, and flagged by `answer_with_meta`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from core.errors import RagError
from readers.kinds import READER_KINDS

log = logging.getLogger(__name__)

READER_FILE = "reader.json"
MODEL_WEIGHTS = "model.safetensors"
ADAPTER_DIR = "adapter"
BASE_SEED = 0  # seeds random parts of a base model (bert2bert cross-attention) so a PEFT run can rebuild it


@dataclass(frozen=True)
class ReaderPassage:
    """One passage fed to a reader. `key` is stable across runs (doc id + passage id): it seeds the
    denoising corruption and keys the CIT reference cache."""
    key: str
    title: str
    text: str
    doc_id: str = ""
    score: float = 0.0

    @classmethod
    def from_hit(cls, hit: Any) -> ReaderPassage:
        pid = getattr(hit, "pid", -1)
        return cls(f"{hit.doc_id}#{pid}", hit.title, hit.text or "", hit.doc_id, float(hit.score))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ReaderPassage:
        return cls(str(row["key"]), str(row.get("title", "")), str(row.get("text", "")), str(row.get("doc_id", "")),
                   float(row.get("score", 0.0)))

    def provenance(self) -> dict[str, Any]:
        return {"wikipedia_id": self.doc_id, "title": self.title, "score": self.score, "text": self.text}


@dataclass
class ReaderConfig:
    max_passage_tokens: int = field(default=128, metadata={"help": "tokens per passage (fid: question + passage)"})
    max_question_tokens: int = field(default=64, metadata={"help": "tokens of the question"})
    max_answer_tokens: int = field(default=24, metadata={"help": "answer tokens (training labels and generation)"})
    num_beams: int = field(default=1, metadata={"help": "beam size for answering"})
    noise_density: float = field(default=0.15, metadata={"help": "denoising: fraction of passage tokens corrupted"})
    mean_span: float = field(default=3.0, metadata={"help": "denoising: mean corrupted span length"})
    corruption_seed: int = field(default=0, metadata={"help": "denoising: combined with the passage key"})
    cit_proxy: str = field(default="auto", metadata={
        "help": "what passage_nll (the CIT likelihood) scores: span (masked salient spans, decoder-only readers), "
                "passage (the whole passage under the reader's denoising objective) or auto (span for causal, "
                "passage for fid)", "choices": ("auto", "span", "passage")})
    max_spans: int = field(default=8, metadata={"help": "span proxy: salient spans masked per passage at most"})


@runtime_checkable
class Reader(Protocol):
    kind: str

    def answer(self, questions: Sequence[str], passages_per_question: Sequence[Sequence[ReaderPassage]]) -> list[str]: ...

    def qa_loss(self, questions: Sequence[str], passages_per_question: Sequence[Sequence[ReaderPassage]],
                answers: Sequence[str]) -> torch.Tensor: ...

    def passage_nll(self, passages: Sequence[ReaderPassage]) -> torch.Tensor: ...


def stable_seed(key: str, seed: int = 0) -> int:
    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


def random_spans_mask(n: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """T5's span-corruption mask: about `density * n` tokens in spans of mean length `mean_span`,
    starting with a kept span (unlike T5, a kept tail may follow the last span, so one short span can
    fall anywhere). Always corrupts at least one token (all of a 1-token passage)."""
    if n <= 1:
        return np.ones(n, dtype=bool)
    num_noise = min(max(int(round(n * density)), 1), n - 1)
    num_keep = n - num_noise
    num_spans = max(1, min(int(round(num_noise / mean_span)), num_noise, num_keep))

    def segment(items: int, segments: int) -> np.ndarray:
        cuts = np.sort(rng.choice(np.arange(1, items), segments - 1, replace=False)) if segments > 1 else []
        return np.diff(np.concatenate([[0], cuts, [items]])).astype(int)

    noise = segment(num_noise, num_spans)
    keep = segment(num_keep + 1, num_spans + 1)  # a kept span before each noise span, then a tail (may be empty)
    keep[-1] -= 1
    mask = np.zeros(n, dtype=bool)
    pos = 0
    for k, z in zip(keep[:-1], noise):
        pos += k
        mask[pos:pos + z] = True
        pos += z
    return mask


def special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids the tokenizer adds around a text (e.g. [CLS] ... [SEP], ... </s>)."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare):])
    return [], []


def model_max_positions(config: Any) -> int | None:
    """Longest input the model's positions allow (None: relative positions, no hard limit)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class BaseReader(torch.nn.Module):
    """Shared state of every reader: model, tokenizer, config, device and input statistics."""

    kind = "base"
    default_model = ""

    @staticmethod
    def load_base(name: str | None) -> tuple[torch.nn.Module, Any]:
        raise NotImplementedError

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: ReaderConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or ReaderConfig()
        self.stats: Counter[str] = Counter()
        self.prefix, self.suffix = special_wrapping(tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokens(self, text: str, limit: int | None = None, count_as: str | None = "truncated_passages") -> list[int]:
        """Ids of `text` without special tokens, cut to `limit` (counted in stats when cut)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if limit is not None and len(ids) > limit:
            if count_as:
                self.stats[count_as] += 1
            ids = ids[:max(limit, 0)]
        return list(ids)

    def answer(self, questions: Sequence[str], passages_per_question: Sequence[Sequence[ReaderPassage]]) -> list[str]:
        return [a for a, _ in self.answer_with_meta(questions, passages_per_question)]

    def answer_with_meta(self, questions: Sequence[str], passages_per_question: Sequence[Sequence[ReaderPassage]],
                         batch_size: int = 8) -> list[tuple[str, dict[str, Any]]]:
        """Answers in batches, each with meta: `no_passages` when answered from the question alone."""
        out: list[tuple[str, dict[str, Any]]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(questions), batch_size):
                    qs = list(questions[start:start + batch_size])
                    ps = [list(p) for p in passages_per_question[start:start + batch_size]]
                    for q, p, a in zip(qs, ps, self._generate(qs, ps)):
                        meta: dict[str, Any] = {"passages": len(p)}
                        if not p:
                            meta["no_passages"] = True
                        out.append((a, meta))
        finally:
            self.model.train(was_training)
        return out

    proxies: tuple[str, ...] = ("passage",)  # the CIT proxies this kind implements; the first is its default

    def cit_proxy(self) -> str:
        """The proxy passage_nll scores ("auto" resolved to the kind's default); a RagError for one it lacks."""
        proxy = self.config.cit_proxy
        if proxy in ("auto", "", None):
            return self.proxies[0]
        if proxy not in self.proxies:
            raise RagError(f"--cit-proxy {proxy}: the {self.kind} reader implements {', '.join(self.proxies)}")
        return proxy

    def objective_signature(self) -> dict[str, Any]:
        """What ℓ(d) depends on besides the weights: a cache of ℓ0 is valid only for the same signature."""
        c = self.config
        return {"kind": self.kind, "objective": self.denoising_objective(), "proxy": self.cit_proxy(),
                "max_passage_tokens": c.max_passage_tokens, "noise_density": c.noise_density,
                "mean_span": c.mean_span, "corruption_seed": c.corruption_seed, "max_spans": c.max_spans,
                "vocab_size": len(self.tokenizer)}

    # implemented by each kind
    def _generate(self, questions: list[str], passages: list[list[ReaderPassage]]) -> list[str]:
        raise NotImplementedError

    def qa_loss(self, questions, passages_per_question, answers) -> torch.Tensor:
        raise NotImplementedError

    def passage_nll(self, passages: Sequence[ReaderPassage]) -> torch.Tensor:
        raise NotImplementedError

    def denoising_objective(self) -> str:
        raise NotImplementedError


def reader_class(kind: str) -> type[BaseReader]:
    if kind not in READER_KINDS:
        raise RagError(f"unknown reader kind {kind!r}; choose one of {', '.join(sorted(READER_KINDS))}")
    module, _, name = READER_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def load_base_model(kind: str, name: str | None) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for a reader kind; random parts of a warm start are seeded (BASE_SEED)."""
    cls = reader_class(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED)
        return cls.load_base(name)


def is_reader_folder(path: str | Path | None) -> bool:
    if not path:
        return False
    p = Path(path)
    return (p / READER_FILE).exists() or (p / "reader" / READER_FILE).exists()


def save_reader(reader: BaseReader, folder: str | Path, base_model: str | None, peft: str | None) -> Path:
    """Write reader.json and the weights. Full tuning: the folder is also a transformers folder
    (`save_pretrained`: config, safetensors weights, generation config, tokenizer), so
    `AutoModelFor...from_pretrained(folder)` loads it. PEFT: only the trained parts (`peft/`; the base model is
    referenced by name and rebuilt on load), and for LoRA also PEFT's own adapter (`adapter/`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"kind": reader.kind, "base_model": base_model or reader.default_model,
                            "peft": peft or "full", "config": dataclasses.asdict(reader.config)}
    if peft and peft != "full":
        from core.peft import save_peft
        from core.peft.export import has_lora, save_lora_adapter
        save_peft(reader.model, folder / "peft", name=peft)
        if peft == "lora" and has_lora(reader.model):
            save_lora_adapter(reader.model, _base_reference(reader, meta["base_model"]), folder / ADAPTER_DIR)
    else:
        reader.model.save_pretrained(str(folder))
        reader.tokenizer.save_pretrained(str(folder))
        meta["saved_as"] = "transformers"
    (folder / READER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder


def _base_reference(reader: BaseReader, base_model: str) -> str:
    """What PEFT's adapter config names as its base: the model's own folder where it came from one."""
    path = getattr(getattr(reader.model, "config", None), "_name_or_path", "") or ""
    return path if path and Path(path).exists() else base_model


def _load_saved_weights(kind: str, folder: Path, meta: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a reader folder: a transformers folder, base + peft/, or base + bare weights."""
    if meta.get("saved_as") == "transformers":  # full tuning, save_pretrained
        return load_base_model(kind, str(folder.resolve()))
    default = reader_class(kind).default_model
    base, tokenizer = load_base_model(kind, meta["base_model"] if meta["base_model"] != default else None)
    if meta.get("peft", "full") != "full":
        from core.peft import load_peft
        return load_peft(base, folder / "peft"), tokenizer
    from safetensors.torch import load_model  # full readers saved before save_pretrained: a bare weights file
    load_model(base, str(folder / MODEL_WEIGHTS))
    return base, tokenizer


def inference_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a CUDA GPU that has it (Ampere or newer), float32 elsewhere: how a reader answers."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_reader(kind: str | None = None, model: str | None = None, config: ReaderConfig | None = None,
                device: str | None = None, config_overrides: dict[str, Any] | None = None,
                for_inference: bool = False) -> BaseReader:
    """A reader from a trained reader folder (a run folder or its `reader/`) or from a base model name.

    `for_inference`: on a GPU with bfloat16 the weights are cast to it (half the memory, faster); training
    keeps float32 weights (with `--bf16` the library autocasts instead)."""
    if is_reader_folder(model):
        folder = Path(model)  # type: ignore[arg-type]
        if not (folder / READER_FILE).exists():
            folder = folder / "reader"
        meta = json.loads((folder / READER_FILE).read_text(encoding="utf-8"))
        if kind and kind != meta["kind"]:
            raise RagError(f"{model} holds a {meta['kind']} reader, not {kind}")
        kind = meta["kind"]
        base, tokenizer = _load_saved_weights(kind, folder, meta)
        cfg = config or ReaderConfig(**{k: v for k, v in meta.get("config", {}).items()
                                        if k in {f.name for f in dataclasses.fields(ReaderConfig)}})
    else:
        # The default reader is the decoder-only one (Gemma-3-270M offline): the only pretrained generator
        # packaged here. The offline FiD default is a bert2bert warm start whose decoder never learned to generate.
        kind = kind or "causal"
        base, tokenizer = load_base_model(kind, model)
        cfg = config or ReaderConfig()
    if config_overrides:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in config_overrides.items() if v is not None})
    reader = reader_class(kind)(base, tokenizer, cfg)
    from core.training.loop import pick_device
    placed = pick_device(device)
    reader.to(placed)
    if for_inference and (dtype := inference_dtype(placed)) != torch.float32:
        reader.to(dtype)
    reader.eval()
    return reader


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL per row over positions whose label is not -100 (logits aligned with labels)."""
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                            reduction="none")
    valid = (labels != -100).float()
    return (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
