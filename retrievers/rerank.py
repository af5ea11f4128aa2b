"""Re-ranking: a cross-encoder scores (question, passage) pairs of a first-stage run and reorders them.

The model is a sentence-transformers `CrossEncoder` (any HF encoder id or folder; by default the packaged
MiniLM with a new mean-pooled scoring head; see `load_base_cross_encoder`). Training (`rag train reranker`) runs on sentence-transformers'
`CrossEncoderTrainer` with a pointwise loss (binary cross-entropy over the gold passage and BM25 hard
negatives) or a listwise one (ListNet over the gold passage and its negatives as one list). Full tuning
saves a plain CrossEncoder folder (`CrossEncoder(path)` loads it anywhere); a PEFT method (core/peft)
saves its trained parameters in `peft/` on top of the named base, as the dense retriever does.

Candidates are scored on `title: text` of the passage each hit carries (the provenance text of a KILT
guess), so a run from any index kind can be re-ranked without reopening the index.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import opt
from core.errors import InputError, RagError
from core.training.hf import ScaleConfig

logger = logging.getLogger(__name__)

RUN_META = "reranker_run.json"
PEFT_DIR = "peft"
HEAD_WEIGHTS = "head.safetensors"
MODEL_DIR = "model"
KIND = "reranker"
# 3: a training run folder (config.json, curves.csv, checkpoints/, metrics.json) with the CrossEncoder in
# model/ (full tuning); 2: the CrossEncoder at the folder's root (still loaded). head.safetensors holds head_state().
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
LOSSES = ("bce", "listnet", "mnrl")


def _check_base(name: str | None) -> None:
    """The `base` field's check: a Gemma backbone alias is checked without building anything."""
    from core.encoder_backbones import backbone_layers
    from core.models import check_model
    if name and not backbone_layers(name)[0]:
        check_model(name)


def _is_head(name: str) -> bool:
    """A parameter of a sequence-classification head: `classifier` (BERT-like) or `score` (Llama/Gemma-like)."""
    parts = name.split(".")
    return "classifier" in parts or parts[0] == "score"


@dataclass
class RerankerTrainConfig(ScaleConfig):
    # The default recipe (chosen on 60 held-out training questions, docs/experiments/rerank): mean-pooled head,
    # listwise loss over the gold passage and 7 BM25 negatives, 120 steps of 4 questions, lr 1e-4.
    max_steps: int = opt(120, "optimizer steps", min=1)
    batch_size: int = opt(4, "examples per step (listnet/mnrl: questions, each with its negatives; bce: pairs)", min=1)
    lr: float = opt(1e-4, "peak learning rate (linear warm-up, then linear decay)", gt=0, finite=True)
    warmup_steps: int = opt(12, "linear warm-up steps", min=0)
    corpus: str = opt("", "corpus JSONL or a folder holding corpus.jsonl")
    train: str = opt("", "KILT JSONL of training questions (gold pages in the corpus)")
    dev: str | None = opt(None, "KILT JSONL: BM25 top --rerank-depth re-ranked before and after training (Rprec, recall@5, success@1, success@10)")
    base: str = opt("minilm", "encoder to start from (alias, folder or hub id); a new scoring head is added; "
                              "gemma-3-270m[-L{N}]: Gemma-3-270M (first N layers) scored at its last token",
                    check=_check_base)
    peft: str = opt("full", "PEFT method (core/peft registry)", check="peft")
    rank: int | None = opt(None, "bottleneck / LoRA rank (method default if unset)", min=1)
    peft_options: str = opt("", "PEFT method options KEY=VALUE,... (e.g. placement=houlsby,init=small,first_c=use "
                                "for iaa/adapter; docs/peft-backbones.md)")
    loss: str = opt("listnet", "bce (pointwise: gold vs each negative), listnet (listwise: softmax of the scores against "
                           "the softmax of the 0/1 labels) or mnrl (softmax cross-entropy: the gold passage against "
                           "its hard negatives and 4 in-batch negatives)", choices=LOSSES)
    bm25_index: str | None = opt(None, "BM25 index of the corpus for negatives and dev candidates (built if unset)")
    negatives: int = opt(7, "BM25 hard negatives per question (non-gold pages of its top --negative-depth)", min=1)
    negative_depth: int = opt(30, "BM25 depth the negatives are drawn from", min=1)
    rerank_depth: int = opt(50, "dev evaluation: re-rank this many BM25 candidates", min=1)
    max_length: int = opt(128, "tokens per (question, passage) pair", min=8)
    words_per_passage: int = opt(100, "words of a page used as its passage", min=1)
    eval_batch_size: int = opt(64, "pairs per scoring batch", min=1)


# ---------------------------------------------------------------------------------------------- models

def _resolve_base(name: str) -> str:
    """A folder or hub id for a base; a Gemma backbone alias (gemma-3-270m[-L{N}]) is its cross-encoder folder
    (core/encoder_backbones.py: last-token scoring head, right padding), not the bi-encoder the alias names."""
    from core.encoder_backbones import cross_encoder_for
    from core.models import resolve_model
    return cross_encoder_for(name) or resolve_model(name)


def _is_sequence_classifier(path: str) -> bool:
    """A checkpoint that already has a scoring head (a trained cross-encoder, e.g. ms-marco-MiniLM)."""
    from transformers import AutoConfig

    try:
        archs = AutoConfig.from_pretrained(path, trust_remote_code=False).architectures or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_base_cross_encoder(base: str, max_length: int = 256, device: str | None = None) -> Any:
    """A CrossEncoder with one output score.

    A checkpoint with a sequence-classification head (a trained cross-encoder) is used as it is. Any other
    encoder gets a mean-pooled scoring head: Transformer -> mean Pooling -> Dense(dim, 1), seeded. Mean
    pooling, not the [CLS] pooler, because an encoder trained as a mean-pooled bi-encoder (the packaged
    MiniLM) gives nearly the same [CLS] vector for every pair (mean pairwise cosine 0.67 against 0.14 for
    mean pooling over 200 FanOutQA dev pairs), and a head on it learns from almost no signal. The folder
    saved from either is a plain sentence-transformers CrossEncoder (`CrossEncoder(path)`).
    """
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers.utils import logging as hf_logging

    path = _resolve_base(base)
    if _is_sequence_classifier(path):
        return CrossEncoder(path, num_labels=1, max_length=max_length, device=device, trust_remote_code=False)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            encoder = Transformer(path, transformer_task="feature-extraction", max_seq_length=max_length)
            dim = encoder.get_embedding_dimension()
            modules = [encoder, Pooling(dim, "mean"), Dense(dim, 1, activation_function=None,
                                                             module_output_name="scores")]
            ce = CrossEncoder(modules=modules, device=device)
    finally:
        hf_logging.set_verbosity(level)
    return ce


def head_state(ce: Any) -> dict[str, Any]:
    """The scoring head's tensors: the modules after the encoder (mean-pooled head), or the HF model's
    `classifier` (sequence-classification head); saved beside a PEFT adapter, which covers the encoder."""
    state = {f"module{i}.{k}": v.detach().contiguous() for i, module in enumerate(ce) if i > 0
             for k, v in module.state_dict().items()}
    state.update({f"hf.{k}": v.detach().contiguous() for k, v in ce[0].model.state_dict().items()
                  if _is_head(k)})
    return state


def load_head_state(ce: Any, state: dict[str, Any]) -> None:
    for i, module in enumerate(ce):
        if i > 0:
            part = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"module{i}.")}
            if part:
                module.load_state_dict(part)
    hf = {k[3:]: v for k, v in state.items() if k.startswith("hf.")}
    if hf:
        ce[0].model.load_state_dict(hf, strict=False)


def is_reranker_run(path: str | Path) -> bool:
    return (Path(path) / RUN_META).is_file()


def load_reranker(spec: str | Path, device: str | None = None, max_length: int | None = None) -> Any:
    """A trained re-ranker run folder, or any CrossEncoder folder / hub id (used as is)."""
    from sentence_transformers import CrossEncoder

    path = Path(spec)
    if not is_reranker_run(path):
        if path.exists() and not (path / "config.json").exists():
            raise RagError(f"{path} is neither a re-ranker run ({RUN_META}) nor a CrossEncoder folder (config.json)")
        return CrossEncoder(str(spec) if path.exists() else _resolve_base(str(spec)), device=device,
                            max_length=max_length, trust_remote_code=False)
    meta = json.loads((path / RUN_META).read_text(encoding="utf-8"))
    if meta.get("format_version") not in READ_VERSIONS:
        raise RagError(f"{path / RUN_META}: unsupported format_version {meta.get('format_version')!r}")
    if meta["peft"] == "full":
        return CrossEncoder(str(path / meta.get("model", ".")), device=device, max_length=max_length or meta["max_length"],
                            trust_remote_code=False)
    from safetensors.torch import load_file

    from core.peft import load_peft

    ce = load_base_cross_encoder(meta["base"], max_length or meta["max_length"], device)
    ce[0].model = load_peft(ce[0].model, path / PEFT_DIR)  # the HF model inside the CrossEncoder's module
    load_head_state(ce, load_file(str(path / HEAD_WEIGHTS)))
    return ce


# ---------------------------------------------------------------------------------------------- scoring

def passage_of(hit: dict[str, Any]) -> str:
    """`title: text` of a KILT provenance entry (what the cross-encoder reads)."""
    title, text = str(hit.get("title") or ""), str(hit.get("text") or "")
    return f"{title}: {text}" if title and text else (title or text)


def score_pairs(ce: Any, queries: Sequence[str], passages: Sequence[str], batch_size: int = 64) -> np.ndarray:
    if not queries:
        return np.zeros(0, dtype=np.float32)
    scores = ce.predict(list(zip(queries, passages)), batch_size=batch_size, show_progress_bar=False,
                        convert_to_numpy=True)
    return np.asarray(scores, dtype=np.float32).reshape(-1)


def rerank(ce: Any, questions: Sequence[str], candidates: Sequence[Sequence[dict[str, Any]]], k: int | None = None,
           batch_size: int = 64) -> list[list[dict[str, Any]]]:
    """Each question's candidates (KILT provenance dicts) reordered by cross-encoder score, best first.

    The score replaces the first-stage `score`; ties keep the first-stage order (a stable sort). `k` keeps
    the best k after re-ranking (None: all).
    """
    if k is not None and k < 1:
        raise RagError("--k must be at least 1")
    flat_q = [q for q, cands in zip(questions, candidates) for _ in cands]
    flat_p = [passage_of(c) for cands in candidates for c in cands]
    scores = score_pairs(ce, flat_q, flat_p, batch_size)
    out, start = [], 0
    for cands in candidates:
        part = scores[start:start + len(cands)]
        start += len(cands)
        order = sorted(range(len(cands)), key=lambda i: -float(part[i]))
        ranked = [{**cands[i], "score": float(part[i])} for i in order]
        out.append(ranked[:k] if k else ranked)
    return out


def rerank_hits(ce: Any, questions: Sequence[str], rankings: Sequence[Sequence[Any]], k: int | None = None,
                batch_size: int = 64) -> list[list[Any]]:
    """`rerank` for retriever output (lists of `retrievers.base.Hit`): the same hits, reordered and rescored."""
    from dataclasses import replace

    ranked = rerank(ce, questions, [[h.provenance() for h in hits] for hits in rankings], k=k, batch_size=batch_size)
    out = []
    for hits, lst in zip(rankings, ranked):
        by_id = {h.doc_id: h for h in hits}
        out.append([replace(by_id[d["wikipedia_id"]], score=float(d["score"])) for d in lst])
    return out


# ---------------------------------------------------------------------------------------------- training

@dataclass
class RerankExample:
    question: str
    gold_ids: tuple[str, ...]
    positive: str
    negatives: list[str]


def _bm25_index(config: RerankerTrainConfig, out: Path) -> Path:
    if config.bm25_index:
        return Path(config.bm25_index)
    from retrievers.bm25 import build_bm25_index
    from retrievers.index_kinds import index_config

    cache = out / "bm25-index"
    if not (cache / "manifest.json").exists():
        build_bm25_index(config.corpus, cache, index_config("bm25", {"words_per_passage": config.words_per_passage,
                                                             "stride": min(80, config.words_per_passage)}),
                         overwrite=True)
    return cache


def training_examples(config: RerankerTrainConfig, corpus: Any, bm25_dir: Path) -> tuple[list[RerankExample], dict]:
    """Each training question with its gold page's passage and BM25 hard negatives (non-gold pages)."""
    from retrievers.bm25 import BM25Retriever
    from retrievers.training_pairs import document_text, question_pairs

    pairs, report = question_pairs(config.train, corpus)
    retriever = BM25Retriever(bm25_dir)
    rng = np.random.default_rng(config.seed)
    examples: list[RerankExample] = []
    random_fill = 0
    ids = [d.id for d in corpus.documents]
    for start in range(0, len(pairs), 256):
        chunk = pairs[start:start + 256]
        for pair, hits in zip(chunk, retriever.retrieve([p.query for p in chunk], k=config.negative_depth)):
            # Each page is read as re-ranking will read it: its best BM25 passage for this question
            # (a page's lead passage where BM25 did not return it), so training and use see the same text.
            best = {h.doc_id: passage_of(h.provenance()) for h in hits if h.text}
            barred = set(pair.gold_ids) | {pair.positive_id}
            negs = [h.doc_id for h in hits if h.doc_id not in barred and h.doc_id in corpus][:config.negatives]
            while len(negs) < config.negatives and len(ids) > len(barred) + len(negs):
                pick = ids[int(rng.integers(len(ids)))]
                if pick not in barred and pick not in negs:
                    negs.append(pick)
                    random_fill += 1
            positive = best.get(pair.positive_id) or document_text(pair.positive_id, corpus, config.words_per_passage)
            examples.append(RerankExample(pair.query, pair.gold_ids, positive,
                                          [best.get(n) or document_text(n, corpus, config.words_per_passage)
                                           for n in negs]))
    return examples, {"train_file": report.to_json(), "examples": len(examples), "random_negatives": random_fill}


def _dataset(examples: Sequence[RerankExample], loss: str) -> Any:
    from datasets import Dataset

    if loss == "mnrl":
        n = min(len(e.negatives) for e in examples) if examples else 0
        return Dataset.from_dict({"query": [e.question for e in examples], "positive": [e.positive for e in examples],
                                  **{f"negative_{i + 1}": [e.negatives[i] for e in examples] for i in range(n)}})
    if loss == "listnet":
        return Dataset.from_dict({"query": [e.question for e in examples],
                                  "docs": [[e.positive, *e.negatives] for e in examples],
                                  "labels": [[1.0] + [0.0] * len(e.negatives) for e in examples]})
    rows: dict[str, list[Any]] = {"query": [], "passage": [], "label": []}
    for e in examples:
        for text, label in [(e.positive, 1.0), *((n, 0.0) for n in e.negatives)]:
            rows["query"].append(e.question)
            rows["passage"].append(text)
            rows["label"].append(label)
    return Dataset.from_dict(rows)


def _loss(ce: Any, name: str) -> Any:
    from sentence_transformers.cross_encoder.losses import (
        BinaryCrossEntropyLoss,
        ListNetLoss,
        MultipleNegativesRankingLoss,
    )

    if name not in LOSSES:
        raise RagError(f"--loss must be one of {', '.join(LOSSES)}, not {name!r}")
    if name == "mnrl":
        return MultipleNegativesRankingLoss(ce)
    # ListNet scores every (question, passage) pair of the batch in one forward pass (mini_batch_size -1; 0 would
    # read as "unset" and fall back to one pass per question): under
    # DDP a parameter may join only one forward per backward, and one pass is what makes N workers equal one.
    return ListNetLoss(ce, mini_batch_size=-1) if name == "listnet" else BinaryCrossEntropyLoss(ce)


def dev_candidates(config: RerankerTrainConfig, bm25_dir: Path) -> tuple[list[dict[str, Any]], list[list[dict]]]:
    from core.tasks import load_queries
    from retrievers.bm25 import BM25Retriever

    queries = load_queries(config.dev)  # type: ignore[arg-type]
    retriever = BM25Retriever(bm25_dir)
    hits = retriever.retrieve([q.text for q in queries], k=config.rerank_depth)
    rows = [{"id": q.id, "input": q.text} for q in queries]
    return rows, [[h.provenance() for h in ranked] for ranked in hits]


def evaluate_rerank(ce: Any, config: RerankerTrainConfig, dev_rows: list[dict[str, Any]],
                    candidates: list[list[dict]], with_bm25: bool = True,
                    with_reranked: bool = True) -> dict[str, Any]:
    """KILT Rprec, recall@5, success@1 and success@10 of the re-ranked BM25 candidates (and of BM25 itself)."""
    from eval.kilt import evaluate_kilt

    runs = [("bm25", candidates)] if with_bm25 else []
    if with_reranked:
        runs.append(("reranked", rerank(ce, [r["input"] for r in dev_rows], candidates,
                                        batch_size=config.eval_batch_size)))
    result = {}
    for name, lists in runs:
        guesses = [{"id": r["id"], "output": [{"provenance": lst}]} for r, lst in zip(dev_rows, lists)]
        scores = evaluate_kilt(guesses, str(config.dev), ks=(1, 5, 10))["retrieval"]
        result[name] = {m: scores[m] for m in ("Rprec", "recall@5", "success_rate@1", "success_rate@10")
                        if m in scores}
    return result


def _apply_method(ce: Any, config: RerankerTrainConfig) -> None:
    if config.peft == "full":
        return
    from core.peft import apply_peft, peft_config
    from core.peft.api import method_overrides

    options = method_overrides(config)
    ce[0].model = apply_peft(ce[0].model, config.peft, peft_config(config.peft, **options))
    for name, p in ce[0].model.named_parameters():
        if _is_head(name):
            p.requires_grad_(True)  # the new scoring head always trains


def _check_train(config: RerankerTrainConfig) -> None:
    """The one-line refusals, before any work (the driver's part under Ray)."""
    from core.peft import PEFT_METHODS
    from core.training.hf import check_scale

    if not config.corpus or not config.train:
        raise RagError("--corpus and --train are required")
    from core.corpus import resolve_corpus_path

    resolve_corpus_path(config.corpus)  # a missing corpus is one line here, not a traceback from a worker
    for flag, value in (("--train", config.train), ("--dev", config.dev), ("--bm25-index", config.bm25_index)):
        if value and not Path(value).exists():
            raise RagError(f"{flag} {value}: no such file or folder")
    if config.peft not in PEFT_METHODS:
        raise RagError(f"unknown PEFT method {config.peft!r}; allowed: {sorted(PEFT_METHODS)}")
    if config.loss not in LOSSES:
        raise RagError(f"--loss must be one of {', '.join(LOSSES)}, not {config.loss!r}")
    if (config.workers > 1 or config.gpus_per_worker) and config.loss == "mnrl":
        raise RagError("--loss mnrl on --workers/--gpus-per-worker: its in-batch negatives would be each worker's "
                       "own (not gathered), so N workers would not train like one of N x the batch; use listnet or bce")
    check_scale(config)


def train_reranker(config: RerankerTrainConfig, out: str | Path, resume: bool = False,
                   overwrite: bool = False) -> dict[str, Any]:
    """Train a cross-encoder into the run folder `out` (config, curves, checkpoints, metrics); the model is a
    CrossEncoder folder in `out/model` (full) or base + `peft/` + `head.safetensors` (PEFT).

    With `--workers N` (or `--gpus-per-worker`) the same training runs in N Ray Train workers (data parallel,
    `--batch-size` questions each; listwise and pointwise losses average over questions and pairs, so N
    workers of batch B train like one worker of batch N*B). Each worker builds its own BM25 index when
    `--bm25-index` is not given (no shared temporary storage is assumed); worker 0 writes `out`, which must be
    on storage the workers see; a worker group that fails resumes from the last checkpoint.
    """
    _check_train(config)
    if config.workers > 1 or config.gpus_per_worker:
        from core.training.ray_train import launch

        return launch("retrievers.rerank:ray_entry", config, out, KIND, resume, overwrite)
    return _fit(config, Path(out), resume, overwrite)


def ray_entry(config: RerankerTrainConfig, out: Path, worker: Any) -> None:
    """One Ray Train worker (core/training/ray_train.py): its share of every batch; worker 0 writes `out`."""
    _fit(config, out, resume=False, overwrite=False, worker=worker)


def _evaluator(config: RerankerTrainConfig, dev: tuple[list[dict[str, Any]], list[list[dict]]]) -> Any:
    """The KILT dev evaluation (BM25's top --rerank-depth re-ranked) as a sentence-transformers evaluator, so
    the trainer runs it at step 0, every --eval-every steps and at the end."""
    from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

    class KiltRerankEvaluator(BaseEvaluator):
        def __init__(self) -> None:
            super().__init__()
            self.name, self.primary_metric = "kilt-dev", "Rprec"

        def __call__(self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1,
                     **_: Any) -> dict[str, float]:
            scores = evaluate_rerank(model, config, *dev, with_bm25=False)["reranked"]
            return self.prefix_name_to_metrics(scores, self.name)

    return KiltRerankEvaluator()


def _fit(config: RerankerTrainConfig, out: Path, resume: bool, overwrite: bool, worker: Any = None) -> dict[str, Any]:
    import tempfile

    import torch
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments

    from core.corpus import Corpus
    from core.training.hf import (
        RunFolderCallback,
        check_scale,
        quiet_progress,
        reporter_callbacks,
        step_zero_and_end,
        train_from,
        training_arguments,
    )
    from core.training.loop import pick_device
    from core.training.ray_train import fault_injection, open_run, worker_device

    is_main = worker is None or worker.is_main
    run, resume = open_run(out, config, KIND, resume, overwrite, worker)
    with run, tempfile.TemporaryDirectory(prefix="rag-rerank-") as work:
        device = str(pick_device(worker_device(config, worker)))
        torch.manual_seed(config.seed)
        start = time.perf_counter()
        corpus = Corpus.load(config.corpus)
        bm25_dir = _bm25_index(config, Path(work)) if not config.bm25_index else Path(config.bm25_index)
        examples, info = training_examples(config, corpus, bm25_dir)
        ce = load_base_cross_encoder(config.base, config.max_length, device)
        _apply_method(ce, config)
        trainable = sum(p.numel() for p in ce.parameters() if p.requires_grad)
        total = sum(p.numel() for p in ce.parameters())
        dev = dev_candidates(config, bm25_dir) if config.dev else None
        if config.gradient_checkpointing:
            from core.training.hf import enable_gradient_checkpointing
            check_scale(config, device, ce)
            enable_gradient_checkpointing(ce)
        resume_from = run.latest_checkpoint() if resume else None
        if resume_from is not None and is_main:
            run.truncate_curves(int(resume_from.name.split("-")[1]))
        callback = RunFolderCallback(run, evaluates=dev is not None, is_main=is_main)
        args = training_arguments(CrossEncoderTrainingArguments, config, run.checkpoints, device,
                                  dataloader_drop_last=False, eval_on_start=dev is not None,
                                  eval_strategy="steps" if dev is not None and config.eval_every else "no")
        trainer = _trainer_class()(
            model=ce, args=args, train_dataset=_dataset(examples, config.loss), loss=_loss(ce, config.loss),
            evaluator=_evaluator(config, dev) if dev else None,
            callbacks=[callback, *reporter_callbacks(config, out, is_main),
                       *(fault_injection(worker.rank, out) if worker is not None else [])])
        progress = quiet_progress(trainer)
        unused = _freeze_unused(ce) if worker is not None and worker.world_size > 1 else []
        seconds, done = train_from(trainer, progress, resume_from, config.max_steps)
        for param in unused:
            param.requires_grad_(True)  # saved as trainable, as a one-process run saves them
        losses = [r for r in run.read_curves() if r["split"] == "train" and r["metric"] == "loss"]
        dev_step0, dev_end = step_zero_and_end(callback.dev_by_step)
        bm25_dev = evaluate_rerank(None, config, *dev, with_reranked=False)["bm25"] if dev and is_main else None
        metrics: dict[str, Any] = {
            "peft": config.peft, "loss": config.loss, "trainable_params": trainable, "total_params": total,
            "trainable_fraction": trainable / total, "workers": worker.world_size if worker else 1,
            "examples_per_step": config.batch_size * config.gradient_accumulation_steps
            * (worker.world_size if worker else 1), **info,
            "steps": config.max_steps, "resumed_from": config.max_steps - done,
            "seconds_per_step": seconds / max(done, 1),
            "train_loss": {"first": losses[0]["value"] if losses else None,
                           "last": losses[-1]["value"] if losses else None,
                           "by_step": {str(r["step"]): r["value"] for r in losses}},
            "dev_step0": {"bm25": bm25_dev, "reranked": dev_step0} if dev_step0 else None,
            "dev": {"bm25": bm25_dev, "reranked": dev_end} if dev_end else None}
        if not is_main:
            return metrics
        _save(ce, config, out)
        metrics["seconds"] = time.perf_counter() - start
        run.write_metrics(metrics)
        metrics["plots"] = [str(p) for p in run.plot()]
        run.write_metrics(metrics)
    return metrics


def _save(ce: Any, config: RerankerTrainConfig, out: Path) -> None:
    """The model into the run folder; reranker_run.json last, so a folder without it is not a finished run."""
    from core.io import atomic_dir, read_json, write_json

    old = read_json(out / RUN_META) if (out / RUN_META).is_file() else {}
    (out / RUN_META).unlink(missing_ok=True)
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "base": config.base, "peft": config.peft,
                            "max_length": config.max_length}
    if config.peft == "full":
        with atomic_dir(out / MODEL_DIR, overwrite=True, owned=old.get("model") == MODEL_DIR) as tmp:
            ce.save_pretrained(str(tmp))  # a resumed run replaces the model/ its own run metadata named
        meta["model"] = MODEL_DIR
    else:
        from safetensors.torch import save_file

        from core.peft import save_peft
        head_params = [p for n, p in ce[0].model.named_parameters() if _is_head(n)]
        for p in head_params:  # the head is saved on its own (head.safetensors), not as a PEFT part
            p.requires_grad_(False)
        save_peft(ce[0].model, out / PEFT_DIR, name=config.peft)
        for p in head_params:
            p.requires_grad_(True)
        save_file(head_state(ce), str(out / HEAD_WEIGHTS))
    write_json(out / RUN_META, meta)


def _trainer_class() -> type:
    from sentence_transformers.cross_encoder import CrossEncoderTrainer

    from core.training.hf import SafeCheckpoints

    class RerankerTrainer(SafeCheckpoints, CrossEncoderTrainer):
        """CrossEncoderTrainer whose checkpoints hold only trained tensors, in safetensors + JSON."""

    return RerankerTrainer


def _freeze_unused(ce: Any) -> list[Any]:
    """Freeze the trainable parameters that never reach the score (BERT's pooler under the mean-pooled head),
    found by one backward pass on a dummy pair; returns them.

    DDP must otherwise search the graph for unused parameters at every step, which it cannot do through the
    CrossEncoder's output ("marked ready twice"). Frozen or not, these parameters get no gradient.
    """
    from sentence_transformers.util import batch_to_device

    ce.zero_grad(set_to_none=True)
    tokens = batch_to_device(ce.preprocess([("a question", "a passage")]), ce.device)
    ce(tokens)["scores"].sum().backward()
    unused = [p for p in ce.parameters() if p.requires_grad and p.grad is None]
    ce.zero_grad(set_to_none=True)
    for param in unused:
        param.requires_grad_(False)
    return unused


def read_guess_candidates(path: str | Path) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """KILT guesses -> (rows, each row's provenance list); a guess without passage text is an error."""
    from core.io import iter_jsonl

    rows, cands = [], []
    for line, obj in iter_jsonl(path):
        outputs = obj.get("output")
        if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
            raise InputError("expected output[0].provenance (a KILT guess from rag retrieve)", path, line, "output")
        prov = outputs[0].get("provenance")
        if not isinstance(prov, list) or not all(isinstance(p, dict) for p in prov):
            raise InputError("expected a list of objects", path, line, "output[0].provenance")
        if prov and not any(p.get("text") for p in prov):
            raise InputError("the candidates carry no passage text to re-rank (write them with rag retrieve)",
                             path, line, "output[0].provenance[].text")
        rows.append(obj)
        cands.append(prov)
    if not rows:
        raise InputError("no guesses", path)
    return rows, cands
