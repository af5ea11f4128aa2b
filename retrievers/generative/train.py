"""Train the generative retriever (CorpusBrain): pre-train on ISS/LPS/HIP pairs, fine-tune on KILT data.

`rag train retriever --kind generative --stage pretrain --corpus C --out RUN [--tasks iss,lps,hip]
    [--peft full|iaa|lora]`
`rag train retriever --kind generative --stage finetune --init RUN --train TRAIN.jsonl [--dev DEV.jsonl] --out RUN2`

* Pairs: retrievers/generative/pretrain_tasks.py (``--pairs FILE`` reuses `rag data pretrain-pairs` output;
  ``--max-pairs N`` keeps a seeded random subset). Fine-tuning targets are the gold titles joined with
  `` | ``; examples none of whose gold pages is in the corpus are skipped and counted.
* Labels are built per title with the tokenizer the trie uses (no special tokens), joined by the
  separator tokens of " |" and closed by EOS, so every target is a path of the title trie (with
  restarts after the separator); the decoder input is the decoder start token + labels[:-1].
  (BERT: "A |B" and "A | B" tokenise the same; a BPE tokenizer would not, hence per-title encoding.)
* Decoder-only LMs (``--model gemma-3-270m``, any HF causal LM; told apart by the model config): each
  example is ``prompt + " " + target + eos`` (retrievers/generative/prompt.py; ``--prompt`` holds
  ``{question}``, pre-training pairs put their source passage there), the target tokens being the trie's
  tokens of the titles after the prompt; the loss is on the target tokens only (-100 on the prompt and the
  padding). Rows are left-padded with position ids from the attention mask, as generate() decodes them.
  ``--title-end newline`` ends titles with a newline instead of EOS (what a pretrained LM writes after
  a title; the trie and the run record it).
* ``--label-smoothing`` (0.1 in the official CorpusBrain scripts) for both kinds.
* PEFT through core.peft: full, iaa, adapter, lora, bitfit (prefix tuning does not fit EncoderDecoderModel;
  bitfit needs bias parameters, which Gemma does not have).
  ``--init RUN`` continues the run's own adapters (same method), or puts a new method on a full run.
* The loop, progress, checkpoints, ``--resume`` (refused with a different config), curves and metrics
  are core.training's. Dev evaluation decodes the dev questions with beam ``--eval-beams`` under the trie
  of the whole corpus: KILT Rprec, recall@5/10, and queries per second.

The run folder: config.json, metrics.json, curves.csv, curves-*.png, checkpoints/, generative_run.json,
tokenizer/, and model/ (full: save_pretrained, safetensors) or peft/ (only the trained parameters +
the base reference in generative_run.json). `load_generative(RUN)` (model.py) reads it back.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import opt
from core.errors import RagError
from core.peft import method_names
from core.training.hf import ScaleConfig
from retrievers.generative.model import DEFAULT_MODEL
from retrievers.generative.prompt import DEFAULT_PROMPT, check_template

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
EVAL_KS = (1, 5, 10)


@dataclass
class GenerativeTrainConfig(ScaleConfig):
    stage: str = opt("pretrain", "pretrain (ISS/LPS/HIP pairs) or finetune (KILT questions)", choices=STAGES)
    corpus: str = opt("", "corpus JSONL or folder (finetune: defaults to the --init run's corpus)")
    train: str | None = opt(None, "finetune: KILT JSONL")
    dev: str | None = opt(None, "KILT JSONL evaluated with the trie")
    model: str = opt(DEFAULT_MODEL, "base model (ignored with init): a decoder-only LM (Gemma-3-270M offline; Llama, "
                                    "Qwen from a hub) or a seq2seq one (BART/T5; minilm-bert2bert: a smoke-test "
                                    "model whose decoder never learned to generate)")
    init: str | None = opt(None, "a generative run folder to start from")
    peft: str = opt("full", "PEFT method (core/peft registry; prefix does not fit seq2seq models)", check="peft")
    rank: int | None = opt(None, "bottleneck / LoRA rank (method default if unset)", min=1)
    peft_options: str = opt("", "PEFT method options KEY=VALUE,... (e.g. placement=houlsby,init=small,first_c=use "
                                "for iaa/adapter; docs/peft-backbones.md)")
    tasks: str = opt("iss,lps,hip", "pretrain: tasks, comma-separated (iss, lps, hip)")
    pairs: str | None = opt(None, "pretrain: a pairs JSONL instead of building them")
    max_pairs: int = opt(0, "pretrain: seeded random subset (0 = all)", min=0)
    sentence_windows: str = opt("auto", "pretrain: sentence windows instead of paragraphs (auto | always | never)",
                                 choices=("auto", "always", "never"))
    match_titles: str = opt("auto", "pretrain: anchors from exact title matches (auto | always | never)",
                             choices=("auto", "always", "never"))
    all_anchor_targets: bool = opt(False, "pretrain: keep anchor targets that are not corpus titles")
    max_source_words: int | None = opt(None, "pretrain: cut sources to this many words", min=1)
    hip_per_doc: int = opt(3, "pretrain: HIP anchors per document", min=0)
    train_fraction: float = opt(1.0, "finetune: seeded fraction of the training questions", gt=0, max=1)
    max_source_length: int = opt(128, "source tokens", min=1)
    max_target_length: int = opt(64, "target tokens", min=1)
    eval_beams: int = opt(10, "beams for dev decoding", min=1)
    dev_limit: int = opt(0, "evaluate the first N usable dev questions (0 = all)", min=0)
    eval_batch_size: int = opt(8, "questions per dev decoding batch", min=1)
    prompt: str = opt(DEFAULT_PROMPT, "decoder-only models: prompt template with {question} (pretrain: the source "
                                      "passage); the title follows after a space (seq2seq models ignore it)",
                      check=check_template)
    label_smoothing: float = opt(0.0, "label smoothing of the target cross-entropy (CorpusBrain: 0.1)", min=0, lt=1)
    title_end: str | None = opt(None, "decoder-only models: what ends a title: eos (the tokenizer's EOS) or newline "
                                      "(default: newline where the tokenizer has one, else eos)",
                                choices=("eos", "newline"))


# ---------------------------------------------------------------------------------------------- targets

class TargetEncoder:
    """Title lists -> label ids that follow the trie: [prefix] t1 [sep prefix t2 ...] eos."""

    def __init__(self, tokenizer: Any, start_token_id: int, eos_token_id: int, prefix_token_ids: Sequence[int] = (),
                 max_length: int = 64, context: str | None = None) -> None:
        from retrievers.generative.constrained import separator_ids

        self.tokenizer = tokenizer
        self.start, self.eos = int(start_token_id), int(eos_token_id)
        self.prefix = [int(t) for t in prefix_token_ids]
        self.sep = separator_ids(tokenizer)
        self.max_length = max_length
        self.context = context  # causal LMs: titles are tokenised as they follow the prompt's end (the trie's way)
        self._cache: dict[str, list[int]] = {}

    def title_ids(self, title: str) -> list[int]:
        ids = self._cache.get(title)
        if ids is None:
            from index.trie import encode_titles
            ids = self._cache[title] = encode_titles(self.tokenizer, [title], context=self.context)[0]
        return ids

    def labels(self, titles: Sequence[str]) -> list[int]:
        out: list[int] = []
        for j, title in enumerate(titles):
            part = (self.sep if j else []) + self.prefix + self.title_ids(title)
            if j and len(out) + len(part) + 1 > self.max_length:
                break  # drop whole extra titles rather than cut one
            out.extend(part)
        return out[: self.max_length - 1] + [self.eos]


def collate(pairs: Sequence[Any], tokenizer: Any, targets: TargetEncoder, max_source_length: int, device: Any):
    import torch

    enc = tokenizer([p.source for p in pairs], padding=True, truncation=True, max_length=max_source_length,
                    return_tensors="pt")
    labels = [targets.labels(p.titles) for p in pairs]
    width = max(len(x) for x in labels)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lab = torch.full((len(labels), width), -100, dtype=torch.long)
    dec = torch.full((len(labels), width), pad, dtype=torch.long)
    mask = torch.zeros((len(labels), width), dtype=torch.long)
    for i, x in enumerate(labels):
        lab[i, :len(x)] = torch.tensor(x)
        dec[i, :len(x)] = torch.tensor([targets.start] + x[:-1])
        mask[i, :len(x)] = 1
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
            "decoder_input_ids": dec.to(device), "decoder_attention_mask": mask.to(device), "labels": lab.to(device)}


def collate_causal(pairs: Sequence[Any], prompts: Any, targets: TargetEncoder, max_source_length: int, device: Any,
                   pad_token_id: int):
    """Decoder-only examples: [pad ...] prompt target eos, left-padded (as generate() sees prompts); labels are
    the target tokens at their own positions and -100 on the prompt and the padding; position ids follow the
    attention mask."""
    import torch

    sources = prompts.batch([p.source for p in pairs], max_source_length)
    labels = [targets.labels(p.titles) for p in pairs]
    width = max(len(s) + len(t) for s, t in zip(sources, labels))
    ids = torch.full((len(pairs), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    lab = torch.full((len(pairs), width), -100, dtype=torch.long)
    for i, (src, tgt) in enumerate(zip(sources, labels)):
        n = len(src) + len(tgt)
        ids[i, width - n:] = torch.tensor(src + tgt)
        mask[i, width - n:] = 1
        lab[i, width - len(tgt):] = torch.tensor(tgt)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device),
            "labels": lab.to(device), "target_width": max(len(t) for t in labels)}


def _keeps_logits(model: Any) -> bool:
    import inspect
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def causal_loss(model: Any, batch: dict[str, Any], label_smoothing: float = 0.0):
    """Next-token cross-entropy on the target tokens only. Targets end every (left-padded) row, so only the
    last ``target_width + 1`` positions' logits are computed where the model can (``logits_to_keep``)."""
    labels = batch["labels"]
    feed = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    keep = int(batch.get("target_width") or labels.shape[1] - 1) + 1
    if keep < labels.shape[1] and _keeps_logits(model):
        logits = model(**feed, logits_to_keep=keep).logits
    else:
        logits = model(**feed).logits
    logits = logits[:, -keep:-1] if logits.shape[1] == keep else logits[:, :-1]
    target = labels[:, -logits.shape[1]:]
    return _target_ce(logits, target, label_smoothing)


def _target_ce(logits: Any, labels: Any, label_smoothing: float = 0.0):
    import torch

    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100, label_smoothing=float(label_smoothing))
    with torch.no_grad():
        keep = labels != -100
        acc = ((logits.argmax(-1) == labels) & keep).sum().float() / keep.sum().clamp(min=1)
    return loss, {"ce": float(loss.detach()), "token_acc": float(acc), "target_tokens": float(keep.sum())}


def seq2seq_loss(model: Any, batch: dict[str, Any], label_smoothing: float = 0.0):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"], decoder_attention_mask=batch["decoder_attention_mask"])
    return _target_ce(out.logits, batch["labels"], label_smoothing)


# ---------------------------------------------------------------------------------------------- dev eval

def dev_rows(corpus, dev_path: str | Path, limit: int = 0, with_report: bool = False):
    """The KILT dev rows with a gold page in the corpus (the first ``limit`` of them when limit > 0)."""
    from core.io import read_jsonl
    from retrievers.generative.pretrain_tasks import finetune_pairs

    pairs, report = finetune_pairs(dev_path, corpus, require=True)
    keep = {p.doc_id for p in pairs}
    rows = [r for r in read_jsonl(dev_path) if str(r.get("id")) in keep]
    if limit and limit > 0:
        rows = rows[:limit]
    return (rows, report) if with_report else rows


class GenerativeDevEvaluator:
    """KILT Rprec / recall@k of dev questions decoded under the corpus trie; also queries per second."""

    def __init__(self, corpus, dev_path: str | Path, tokenizer: Any, start: Any, eos: int | None = None,
                 beams: int = 10, limit: int = 0, batch_size: int = 8, max_source_length: int = 128,
                 multi_title: bool = False, ks: Sequence[int] = EVAL_KS) -> None:
        """``start``: the model's TitleSpec (causal LMs: with its prompt), or a seq2seq decoder start id + ``eos``."""
        from retrievers.generative.index import corpus_trie, default_length_penalty

        self.length_penalty = default_length_penalty(start)  # 1 for a seq2seq start id or an EOS-ended spec
        self.rows, self.report = dev_rows(corpus, dev_path, limit, with_report=True)
        self.trie, doc_ids, _ = corpus_trie(corpus, tokenizer, start, eos)
        self.prompt = self.trie.meta.get("prompt")
        self.doc_of = {self.trie.title(i): d for i, d in enumerate(doc_ids)}
        self.tokenizer, self.beams, self.batch_size = tokenizer, beams, batch_size
        self.max_source_length, self.multi_title, self.ks = max_source_length, multi_title, tuple(ks)

    def describe(self) -> dict[str, Any]:
        return {"dev_questions": len(self.rows), "dev_file": self.report.to_json(), "eval_beams": self.beams,
                "eval_length_penalty": self.length_penalty,
                "eval_multi_title": self.multi_title, "trie_titles": len(self.trie)}

    def rankings(self, model: Any) -> tuple[list[list[tuple[str, float]]], float]:
        from retrievers.generative.constrained import decode_titles
        from retrievers.generative.model import prepare_for_generation

        t0 = time.perf_counter()
        ranked = decode_titles(prepare_for_generation(model), self.tokenizer, self.trie,
                               [r["input"] for r in self.rows], num_beams=self.beams,
                               num_return_sequences=self.beams, batch_size=self.batch_size,
                               multi_title=self.multi_title, max_input_length=self.max_source_length,
                               prompt=self.prompt, length_penalty=self.length_penalty)
        return ranked, time.perf_counter() - t0

    def score(self, ranked: list[list[tuple[str, float]]]) -> dict[str, float]:
        from eval.kilt import evaluate_kilt

        guesses = [{"id": r["id"], "output": [{"provenance": [{"wikipedia_id": self.doc_of[t], "title": t, "score": s}
                                                              for t, s in items]}]}
                   for r, items in zip(self.rows, ranked)]
        res = evaluate_kilt(guesses, self.rows, ks=self.ks)["retrieval"]
        out = {"Rprec": res["Rprec"]}
        out.update({f"recall@{k}": res[f"recall@{k}"] for k in self.ks if k > 1})
        out["precision@1"] = res.get("precision@1", 0.0)
        return out

    def evaluate(self, model: Any) -> dict[str, float]:
        ranked, seconds = self.rankings(model)
        return {**self.score(ranked), "queries_per_second": len(self.rows) / max(seconds, 1e-9)}


# ---------------------------------------------------------------------------------------------- data

def training_pairs(config: GenerativeTrainConfig, corpus) -> tuple[list[Any], dict[str, Any]]:
    from retrievers.generative.pretrain_tasks import (
        PretrainConfig,
        build_pairs,
        finetune_pairs,
        parse_tasks,
        read_pairs,
    )

    if config.stage == "pretrain":
        tasks = parse_tasks(config.tasks)
        if config.pairs:
            pairs = [p for p in read_pairs(config.pairs) if p.task in tasks]
            if not pairs:
                raise RagError(f"{config.pairs}: no pairs of the tasks {list(tasks)}")
            info: dict[str, Any] = {"pairs_file": config.pairs}
        else:
            pcfg = PretrainConfig(tasks=tasks, sentence_windows=config.sentence_windows,
                                  match_titles=config.match_titles, all_anchor_targets=config.all_anchor_targets,
                                  max_source_words=config.max_source_words, hip_per_doc=config.hip_per_doc,
                                  seed=config.seed)
            pairs, stats = build_pairs(corpus, pcfg)
            info = {"pair_stats": stats.to_json()}
        available = len(pairs)
        if config.max_pairs and config.max_pairs < len(pairs):
            pick = sorted(random.Random(config.seed).sample(range(len(pairs)), config.max_pairs))
            pairs = [pairs[i] for i in pick]
        counts: dict[str, int] = {}
        for p in pairs:
            counts[p.task] = counts.get(p.task, 0) + 1
        info.update({"pairs_available": available, "train_pairs": len(pairs), "train_pairs_by_task": counts})
        return pairs, info
    if not config.train:
        raise RagError("--stage finetune needs --train TRAIN.jsonl (KILT)")
    pairs, report = finetune_pairs(config.train, corpus)
    logger.info(report.summary())
    if not 0 < config.train_fraction <= 1:
        raise RagError(f"--train-fraction must be in (0, 1], got {config.train_fraction}")
    if config.train_fraction < 1:
        n = max(1, round(len(pairs) * config.train_fraction))
        pick = sorted(random.Random(config.seed).sample(range(len(pairs)), n))
        pairs = [pairs[i] for i in pick]
    return pairs, {"train_file": report.to_json(), "train_pairs": len(pairs)}


# ---------------------------------------------------------------------------------------------- model

def build_model(config: GenerativeTrainConfig):
    """(model ready to train, tokenizer, base reference, base fingerprint) seeded by config.seed."""
    from core.peft import apply_peft, peft_config
    from core.peft.api import method_overrides
    from core.training.loop import seed_everything
    from retrievers.generative.model import base_reference, fingerprint, load_generative, load_run, read_run_meta
    overrides = method_overrides(config)
    peft_config(config.peft, **overrides)  # unknown method / bad rank: fail before loading anything
    seed_everything(config.seed)
    if config.init:
        meta = read_run_meta(config.init)
        if meta.get("prompt") and meta["prompt"] != config.prompt:
            logger.warning("--init %s was trained with the prompt %r; this run trains with %r",
                           config.init, meta["prompt"], config.prompt)
        if meta["weights"] == "peft":
            if config.peft != meta["peft"]:
                raise RagError(f"--init {config.init} holds '{meta['peft']}' adapters: fine-tune them with "
                               f"--peft {meta['peft']}, or start from a run trained with --peft full")
            if config.rank is not None:
                logger.warning("--rank is ignored: the adapters of %s keep their rank", config.init)
            model, tokenizer = load_run(config.init, trainable=True)
            return model, tokenizer, meta["base"], meta.get("base_fingerprint")
        model, tokenizer = load_run(config.init, trainable=config.peft == "full")
        base, base_fp = str(Path(config.init).resolve()), None
        if config.peft != "full":
            base_fp = fingerprint(model)
            model = apply_peft(model, config.peft, **overrides)
        return model, tokenizer, base, base_fp
    model, tokenizer = load_generative(config.model, trainable=True)
    base_fp = fingerprint(model) if config.peft != "full" else None
    model = apply_peft(model, config.peft, **overrides)
    return model, tokenizer, base_reference(config.model), base_fp


# ---------------------------------------------------------------------------------------------- training

def train_generative(config: GenerativeTrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                     corpus=None, worker: Any = None) -> dict[str, Any]:
    """Train and write the run folder; returns metrics.json's content. With `--workers N` (or
    `--gpus-per-worker`) the driver claims the run folder and N Ray Train workers train (`worker` is set in
    them: core/training/ray_train.py); each micro-batch index goes to one worker, so a step sees N batches."""
    from core.corpus import Corpus
    from core.training import TrainLoop
    from core.training.loop import EpochSampler, pick_device
    from retrievers.generative.model import CAUSAL, model_kind, save_run_model, title_spec
    from retrievers.generative.prompt import PromptEncoder

    if config.stage not in STAGES:
        raise RagError(f"--stage must be one of {', '.join(STAGES)}, not {config.stage!r}")
    if config.peft not in method_names(seq2seq=True):
        raise RagError(f"--peft {config.peft!r} is not supported for the generative retriever; choose one of "
                       f"{', '.join(method_names(seq2seq=True))}")
    if not config.corpus:
        raise RagError("--corpus is required (the titles the model learns to generate)")
    from core.training.hf import check_scale
    from core.training.ray_train import launch, open_run, worker_device
    if worker is None:
        check_scale(config)
    corpus = corpus or Corpus.load(config.corpus)
    pairs, data_info = training_pairs(config, corpus)
    kind_name = f"retriever:generative:{config.stage}"
    if (config.workers > 1 or config.gpus_per_worker) and worker is None:
        return launch("retrievers.generative.train:ray_entry", config, out, kind_name, resume, overwrite)
    device = pick_device(worker_device(config, worker))
    model, tokenizer, base, base_fp = build_model(config)
    model.to(device)
    run, resume = open_run(out, config, kind_name, resume, overwrite, worker)
    kind = model_kind(model)
    spec = title_spec(model, tokenizer, config.prompt, config.title_end)
    targets = TargetEncoder(tokenizer, spec.start_token_id, spec.eos_token_id, max_length=config.max_target_length,
                            context=spec.context)
    multi_title = any(len(p.titles) > 1 for p in pairs)
    evaluator = (GenerativeDevEvaluator(corpus, config.dev, tokenizer, spec, None, config.eval_beams,
                                        config.dev_limit, config.eval_batch_size, config.max_source_length,
                                        multi_title)
                 if config.dev else None)
    sampler = EpochSampler(len(pairs), config.batch_size, config.seed)
    if kind == CAUSAL:
        prompts = PromptEncoder(tokenizer, config.prompt)

        def batch_for_step(step: int):
            return collate_causal([pairs[i] for i in sampler.indices(step)], prompts, targets,
                                  config.max_source_length, device, tokenizer.pad_token_id)

        def loss_fn(batch):
            return causal_loss(model, batch, config.label_smoothing)
    else:
        def batch_for_step(step: int):
            return collate([pairs[i] for i in sampler.indices(step)], tokenizer, targets, config.max_source_length,
                           device)

        def loss_fn(batch):
            return seq2seq_loss(model, batch, config.label_smoothing)

    def evaluate() -> dict[str, float]:
        return evaluator.evaluate(model)

    def save_final(path: Path) -> None:
        save_run_model(model, tokenizer, path, method=config.peft, base=base, base_fingerprint=base_fp, spec=spec,
                       extra={"stage": config.stage, "init": str(Path(config.init).resolve()) if config.init else None,
                              "corpus": str(corpus.path), "corpus_checksum": corpus.checksum,
                              "multi_title": multi_title, "max_source_length": config.max_source_length})

    extra = {"stage": config.stage, "peft": config.peft, "lr": config.lr, "base": base, "init": config.init,
             "model_kind": kind, "prompt": spec.prompt, "title_end": spec.title_end if spec.prompt else None,
             "label_smoothing": config.label_smoothing,
             "multi_title_targets": multi_title, **data_info, **(evaluator.describe() if evaluator else {})}
    loop = TrainLoop(run, model, config, batch_for_step, loss_fn,
                     evaluate if evaluator else None, save_final=save_final, resume=resume, extra_metrics=extra)
    t0 = time.perf_counter()
    metrics = loop.fit()
    metrics["train_seconds"] = round(time.perf_counter() - t0, 2)
    if worker is None or worker.is_main:
        run.write_metrics(metrics)
    model.eval()
    return metrics


def ray_entry(config: GenerativeTrainConfig, out: Path, worker: Any) -> None:
    """One Ray Train worker of `train_generative` (core/training/ray_train.py)."""
    train_generative(config, out, worker=worker)


def resolve_run_references(values: dict[str, Any]) -> dict[str, Any]:
    """Options as given (flags or a config file) -> options that name runs and files by absolute path.

    A generative run folder given as `model` starts from that run (`init`); with `init`, the method,
    the corpus and (decoder-only runs) the prompt and title end default to the run's own.
    """
    from retrievers.generative.model import is_generative_run, read_run_meta

    values = dict(values)
    if values.get("model") and not values.get("init") and is_generative_run(values["model"]):
        values["init"] = values.pop("model")
    if values.get("init"):
        meta = read_run_meta(values["init"])
        if not values.get("peft"):
            values["peft"] = meta["peft"]
        if not values.get("corpus") and meta.get("corpus"):
            values["corpus"] = meta["corpus"]
        if not values.get("prompt") and meta.get("prompt"):
            values["prompt"] = meta["prompt"]
        if not values.get("title_end") and meta.get("title_end"):
            values["title_end"] = meta["title_end"]
        values.pop("model", None)
        values["init"] = str(Path(values["init"]).resolve())
    if values.get("model") and Path(values["model"]).expanduser().exists():
        values["model"] = str(Path(values["model"]).expanduser().resolve())
    for key in ("corpus", "train", "dev", "pairs"):
        if values.get(key) and Path(values[key]).exists():
            values[key] = str(Path(values[key]).resolve())
    return values
