"""Train a reader (`rag train reader --kind fid|causal`) on KILT questions with retrieved passages, with CIT.

The passages come from any index folder the toolkit builds (`retrievers.open_retriever`); retrieval is
done once per question file and cached in the run folder (`retrieval/NAME.jsonl`, checked against the
index, k and the file's checksum). The loss is the QA loss plus λ times the CIT hinge (readers/cit.py);
every step logs L_QA and, with λ > 0, ℓθ, ℓ0, their ratio, L_CIT and the fraction of passages where the
hinge is active (curves.csv, curves-train.png); with λ = 0 nothing of CIT is computed. The dev set
is answered every `--eval-every` steps (EM/F1/KILT-EM/KILT-F1). The run folder ends with `reader/`
(reader.json + weights: the whole model, or with PEFT only the trained parts and the base model's name),
which `rag answer --model RUN_DIR` loads.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.training.hf import ScaleConfig

log = logging.getLogger(__name__)

RETRIEVAL_DIR = "retrieval"


@dataclass
class ReaderTrainConfig(ScaleConfig):
    max_steps: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    eval_every: int = 100
    log_every: int = 1
    kind: str = field(default="fid", metadata={"help": "fid | causal"})
    model: str | None = field(default=None, metadata={"help": "base model (default: the kind's default)"})
    index: str = field(default="", metadata={"help": "index folder to retrieve passages from"})
    train: str = field(default="", metadata={"help": "KILT training questions"})
    dev: str | None = field(default=None, metadata={"help": "KILT dev questions (EM/F1 during training)"})
    k: int = field(default=5, metadata={"help": "passages per question", "min": 1})
    peft: str = field(default="full", metadata={"help": "full | iaa | lora | ... (core.peft methods)", "check": "peft"})
    cit_weight: float = field(default=0.0, metadata={"help": "λ of the CIT term (0 = plain training)", "min": 0,
                                                      "finite": True})
    cit_margin: float = field(default=0.0, metadata={"help": "m: ℓθ may fall to (1 - r)·ℓ0 - m without penalty "
                                                              "(nats per token)", "finite": True})
    cit_margin_relative: float = field(default=0.0, metadata={
        "help": "r: relative margin; 0.05 lets the reader's likelihood of a passage get up to 5 percent better than the "
                "reference (ℓθ ≥ 0.95·ℓ0) before the penalty fires", "min": 0, "lt": 1, "finite": True})
    cit_proxy: str = field(default="auto", metadata={
        "help": "the likelihood CIT holds: span (masked salient spans: years, numbers, names), passage (whole-passage "
                "NLL) or auto (span for causal readers, passage for fid)", "choices": ("auto", "span", "passage")})
    peft_targets: str = field(default="", metadata={
        "help": "lora: comma-separated linear module names to adapt, or all-linear (every linear layer but the LM "
                "head); empty: the attention query/value projections"})
    max_passage_tokens: int = field(default=128, metadata={"help": "tokens per passage", "min": 1})
    max_answer_tokens: int = field(default=24, metadata={"help": "answer tokens", "min": 1})
    dev_limit: int = field(default=0, metadata={"help": "answer only the first N dev questions (0 = all)", "min": 0})
    eval_batch_size: int = field(default=16, metadata={"help": "questions per answering batch", "min": 1})


@dataclass
class Example:
    id: str
    question: str
    answers: list[str]
    passages: list[Any]
    gold: dict[str, Any]


def _answers(row: dict[str, Any]) -> list[str]:
    return [str(o["answer"]).strip() for o in row.get("output") or [] if isinstance(o, dict)
            and o.get("answer") is not None and str(o["answer"]).strip()]


def retrieve_cached(folder: Path, name: str, queries_path: str | Path, index: str | Path, k: int,
                    retriever: Any = None) -> tuple[list[Example], Any]:
    """Examples with their top-k passages; retrieval runs once and is cached as JSONL in `folder`."""
    from core.corpus import file_checksum
    from core.io import read_json, read_jsonl, write_json, write_jsonl
    from core.tasks import load_queries
    from readers.base import ReaderPassage

    rows = read_jsonl(queries_path)
    load_queries(queries_path)  # validates ids and inputs with precise errors
    # Keyed by content, not paths: an index rebuilt in place (new manifest) or edited questions recompute.
    key = {"index": str(Path(index).resolve()), "index_manifest": file_checksum(Path(index) / "manifest.json"),
           "k": k, "queries": file_checksum(queries_path)}
    cache, manifest = folder / f"{name}.jsonl", folder / f"{name}.manifest.json"
    fresh = cache.exists() and manifest.exists() and read_json(manifest) == key
    if cache.exists() and not fresh:
        log.warning("retrieval cache %s is stale (index, k or questions changed): retrieving again", cache)
    if fresh:
        cached = {r["id"]: [ReaderPassage.from_json(p) for p in r["passages"]] for r in read_jsonl(cache)}
    else:
        if retriever is None:
            from retrievers import open_retriever
            retriever = open_retriever(index)
        from retrievers.base import retrieve_queries
        hits = retrieve_queries(retriever, [r["input"] for r in rows], k)
        cached = {str(r["id"]).strip(): [ReaderPassage.from_hit(h) for h in hs] for r, hs in zip(rows, hits)}
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(cache, ({"id": str(r["id"]).strip(), "input": r["input"],
                             "passages": [p.to_json() for p in cached[str(r["id"]).strip()]]} for r in rows))
        write_json(manifest, key)
    examples = [Example(str(r["id"]).strip(), r["input"], _answers(r), cached[str(r["id"]).strip()], r) for r in rows]
    return examples, retriever


def answer_examples(reader: Any, examples: list[Example], batch_size: int = 16) -> list[tuple[str, dict[str, Any]]]:
    return reader.answer_with_meta([e.question for e in examples], [e.passages for e in examples], batch_size)


def guess_rows(examples: list[Example], answers: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"id": e.id, "input": e.question, "output": [{"answer": a, "provenance": [p.provenance() for p in e.passages]}],
             **({"meta": meta} if meta.get("no_passages") else {})} for e, (a, meta) in zip(examples, answers)]


def score_answers(examples: list[Example], answers: list[tuple[str, dict[str, Any]]], k: int) -> dict[str, float]:
    """EM, F1, KILT-EM, KILT-F1 (the official definitions, eval/kilt.py)."""
    from eval.kilt import evaluate_kilt

    result = evaluate_kilt(guess_rows(examples, answers), [e.gold for e in examples], ks=(max(k, 1),))
    down, kilt = result.get("downstream", {}), result.get("kilt", {})
    return {"em": down.get("em", 0.0), "f1": down.get("f1", 0.0),
            "KILT-em": kilt.get("KILT-em", 0.0), "KILT-f1": kilt.get("KILT-f1", 0.0)}


def lora_targets(model: Any, spec: str) -> list[str] | None:
    """Module names for `--peft-targets`: None (the method's default), a list as given, or for `all-linear` the
    names of every linear layer of the model except its output head."""
    import torch

    spec = spec.strip()
    if not spec:
        return None
    if spec != "all-linear":
        return [t.strip() for t in spec.split(",") if t.strip()]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    names = {name.rpartition(".")[2] for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}
    return sorted(names)


def ray_entry(cfg: ReaderTrainConfig, out: Path, worker: Any) -> None:
    """One Ray Train worker of `train_reader` (core/training/ray_train.py)."""
    train_reader(cfg, out, worker=worker)


def train_reader(cfg: ReaderTrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                 retriever: Any = None, worker: Any = None) -> dict[str, Any]:
    """Train one reader into `out`; returns the metrics written to metrics.json. With `--workers N` the driver
    claims the run folder and N Ray Train workers train (`worker` is set in them: core/training/ray_train.py)."""
    import torch

    from core.errors import RagError
    from core.training import TrainLoop
    from core.training.loop import EpochSampler, pick_device
    from readers.base import ReaderConfig, load_reader, save_reader
    from readers.cit import REFERENCE_FILE, CITConfig, CITObjective, ReferenceNLL

    if not cfg.index or not cfg.train:
        raise RagError("rag train reader needs --index and --train")
    cit = CITConfig(cfg.cit_weight, cfg.cit_margin, cfg.cit_margin_relative)  # bad values: one line, before any work
    if cfg.peft_targets and cfg.peft != "lora":
        raise RagError(f"--peft-targets applies to --peft lora, not {cfg.peft}")
    from core.training.hf import check_scale
    from core.training.ray_train import launch, open_run, worker_device
    if worker is None:
        check_scale(cfg)
    device = worker_device(cfg, worker)
    from core.io import read_jsonl

    if not any(_answers(row) for row in read_jsonl(cfg.train)):
        raise RagError(f"{cfg.train}: no question has an answer to train on")
    # The model is loaded (and refused if it is the wrong kind) before the run folder is written.
    reader_cfg = ReaderConfig(max_passage_tokens=cfg.max_passage_tokens, max_answer_tokens=cfg.max_answer_tokens,
                              cit_proxy=cfg.cit_proxy)
    reader = load_reader(cfg.kind, cfg.model, reader_cfg, device=device)
    reader.cit_proxy()  # a proxy the kind lacks is refused here
    if (cfg.workers > 1 or cfg.gpus_per_worker) and worker is None:
        return launch("readers.train:ray_entry", cfg, out, f"reader:{cfg.kind}", resume, overwrite)
    run, resume = open_run(out, cfg, f"reader:{cfg.kind}", resume, overwrite, worker)
    cache_dir = run.path / RETRIEVAL_DIR
    train_set, retriever = retrieve_cached(cache_dir, "train", cfg.train, cfg.index, cfg.k, retriever)
    train_set = [e for e in train_set if e.answers]
    if not train_set:
        raise RagError(f"{cfg.train}: no question has an answer to train on")
    dev_set: list[Example] = []
    if cfg.dev:
        dev_set, retriever = retrieve_cached(cache_dir, "dev", cfg.dev, cfg.index, cfg.k, retriever)
        if cfg.dev_limit:
            dev_set = dev_set[:cfg.dev_limit]
    # ℓ0 (only when λ > 0): keyed by the initial weights, scored by the reader itself with its adapters off
    # (PEFT), or precomputed for every training passage before the weights move (full tuning, bitfit)
    reference = ReferenceNLL(reader, run.path / REFERENCE_FILE) if cit.weight > 0 else None
    if cfg.peft != "full":
        from core.peft import apply_peft
        targets = lora_targets(reader.model, cfg.peft_targets)
        reader.model = (apply_peft(reader.model, cfg.peft, target_modules=targets) if targets
                        else apply_peft(reader.model, cfg.peft))
    reader.to(pick_device(device))
    reference_mode = None
    if reference is not None:
        from core.peft import can_disable_adapters
        if can_disable_adapters(reader.model):
            reference_mode = "adapters-off"
        else:
            reference_mode = "precomputed"
            n = reference.precompute([p for e in train_set for p in e.passages])
            reference.freeze()
            reference.save()
            log.info("CIT reference: ℓ0 of %d training passages precomputed", n)
    objective = CITObjective(reader, reference, cit)
    sampler = EpochSampler(len(train_set), cfg.batch_size, cfg.seed)

    def batch_for_step(step: int) -> list[Example]:
        return [train_set[i] for i in sampler.indices(step)]

    def loss_fn(batch: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        return objective([e.question for e in batch], [e.passages for e in batch], [e.answers[0] for e in batch])

    def evaluate() -> dict[str, float]:
        if reference is not None:
            reference.save()
        return score_answers(dev_set, answer_examples(reader, dev_set, cfg.eval_batch_size), cfg.k)

    def save_final(path: Path) -> None:
        save_reader(reader, path / "reader", cfg.model, cfg.peft)
        loop.extra_metrics.update({
            "reader_stats": dict(reader.stats), "train_examples": len(train_set), "dev_examples": len(dev_set)})
        if reference is not None:
            reference.save()
            loop.extra_metrics.update({
                "cit_proxy": reader.cit_proxy(), "cit_reference": reference_mode,
                "cit_reference_passages": len(reference.values), "cit_reference_scored": reference.frozen_calls,
                "cit_skipped_passages": len(objective.skipped)})

    loop = TrainLoop(run, reader.model, cfg, batch_for_step, loss_fn, evaluate if dev_set else None,
                     save_final=save_final, resume=resume)
    metrics = loop.fit()
    if dev_set and (worker is None or worker.is_main):  # predictions of the final reader, for inspection
        from core.io import write_jsonl
        preds = answer_examples(reader, dev_set, cfg.eval_batch_size)
        write_jsonl(run.path / "dev_predictions.jsonl", guess_rows(dev_set, preds))
    log.info("reader %s: %s", cfg.kind, json.dumps(metrics.get("dev", {})))
    return metrics
