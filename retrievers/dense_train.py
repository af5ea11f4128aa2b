"""Tune the dense bi-encoder: multiple-negatives ranking loss, PEFT methods, optional MoE heads.

`rag train retriever --kind dense --corpus C --train TRAIN.jsonl [--dev DEV.jsonl] --peft METHOD --out RUN`

* Examples: questions of a KILT file (question -> gold page) plus, with ``--pseudo-queries N``, N
  sentences of corpus documents (sentence -> rest of its document); see retrievers/training_pairs.py.
* Loss: sentence-transformers' ``MultipleNegativesRankingLoss`` over (query, positive, BM25 hard
  negative): in-batch negatives plus one hard negative per example; batches never hold two examples that
  share a text (a duplicated gold page is never its own question's negative). ``--mini-batch-size`` swaps in
  the cached (GradCache) version: the same loss, embedded a few texts at a time.
* PEFT through core.peft (iaa, adapter, lora, prefix, bitfit, full); with ``--moe-experts N`` expert
  heads per domain (retrievers/moe.py) and domain-homogeneous batches.
* Without MoE heads, sentence-transformers' ``SentenceTransformerTrainer`` runs the loop
  (retrievers/dense_fit.py): ``--bf16``, ``--gradient-accumulation-steps``, ``--gradient-checkpointing``,
  ``--report-to``, ``--workers N`` (Ray Train). MoE heads still train in core.training's own loop (one
  process, fp32).

The run folder holds config.json, ``dense_run.json`` (base model reference, method, max sequence
length, MoE config), the model (``model/``: a sentence-transformers folder for full, bitfit and lora, with
lora's PEFT adapter in ``adapter/``; ``peft/``: core.peft's config + safetensors for iaa, adapter and
prefix; see retrievers/dense_export.py), ``moe.safetensors`` (heads, router), metrics.json, curves.csv and
PNG curves. Any encoder argument (`rag index build --encoder RUN`, `rag retrieve --encoder RUN`) accepts
the folder.

Dev evaluation during training searches the dev questions against a pool of documents: every dev
gold page, optionally each dev question's top ``--eval-bm25-docs`` BM25 documents, plus ``--eval-docs``
documents sampled once (seeded, independent of the training seed); ``--eval-docs 0`` uses the whole
corpus. Encoding all of vital10k takes minutes on a 2-core CPU, hence the pool. KILT R-precision and recall@5/20 (official definitions).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from core.errors import RagError
from retrievers.dense_parts import (  # noqa: F401 - the shared parts, re-exported for callers of this module
    EVAL_KS,
    DenseTrainConfig,
    DevEvaluator,
    TrainingData,
    _bm25_index_for,
    build_model,
    build_training_data,
    corpus_domains,
    moe_config_for,
)
from retrievers.dense_run import FORMAT_VERSION, MOE_WEIGHTS, PEFT_DIR, RUN_META, load_base, load_dense_run  # noqa: F401

logger = logging.getLogger(__name__)



def _trainable_state(model) -> dict:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_run_weights(model, st, config: DenseTrainConfig, out: Path, base_fingerprint: list[float]) -> None:
    from safetensors.torch import save_file

    from core.io import write_json
    from core.peft import peft_config, save_peft
    from core.peft.api import method_overrides
    from retrievers.moe import MoEEncoder
    overrides = method_overrides(config)
    save_peft(st, out / PEFT_DIR, config.peft, peft_config(config.peft, **overrides))
    moe = None
    if isinstance(model, MoEEncoder):
        save_file(model.moe_state_dict(), str(out / MOE_WEIGHTS))
        moe = model.config.to_dict()
    write_json(out / RUN_META, {"format_version": FORMAT_VERSION, "base_model": config.encoder,
                                "peft": config.peft, "max_seq_length": config.max_seq_length,
                                "moe": moe, "base_fingerprint": base_fingerprint})


def train_dense(config: DenseTrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                corpus=None) -> dict[str, Any]:
    """Train and write the run folder; returns metrics.json's content."""
    return fit_dense(config, out, resume, overwrite, corpus)[0]


def _refuse_scale_for_moe(config: DenseTrainConfig) -> None:
    """MoE heads train through core.training's TrainLoop (transformers' Trainer; on Ray Train with --workers,
    each worker its own micro-batches, as accumulation would)."""
    if config.mini_batch_size:
        raise RagError("--mini-batch-size: not available with --moe-experts yet (MoE heads train with the plain "
                       "MNRL loss)")


def _fit_library(config: DenseTrainConfig, out: Path, resume: bool, overwrite: bool, corpus) -> tuple[dict, Any]:
    """Claim the run folder here, then train in this process or in Ray Train workers."""
    from core.training import RunFolder
    from retrievers.dense_fit import KIND, fit_on_ray, fit_with_trainer

    data = build_training_data(config, corpus)  # bad training input fails here, before the run folder exists
    run = RunFolder(out, config, KIND, resume=resume, overwrite=overwrite)
    try:
        if config.workers > 1 or config.gpus_per_worker:
            metrics = fit_on_ray(config, out)
            return metrics, load_dense_run(out)
        return fit_with_trainer(config, out, corpus, data=data)
    finally:
        run.close()


def fit_dense(config: DenseTrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
              corpus=None, worker: Any = None) -> tuple[dict[str, Any], Any]:
    """train_dense, also returning the trained model (tests compare it with the reloaded run folder).
    `worker` is set inside a Ray Train worker of the MoE path (core/training/ray_train.py)."""
    import torch
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from core.corpus import Corpus
    from core.peft import peft_config
    from core.training import TrainLoop
    from core.training.hf import check_scale
    from core.training.loop import EpochSampler, pick_device
    from retrievers.encoders import DenseEncoder
    from retrievers.moe import EXPERT_IDS, router_loss
    from retrievers.training_pairs import DomainBatchSampler, dedupe_batch

    if not config.corpus or not config.train:
        raise RagError("--corpus and --train are required")
    from core.peft.api import method_overrides
    overrides = method_overrides(config)
    peft_config(config.peft, **overrides)  # unknown method / bad rank: fail before any work
    if worker is None:
        check_scale(config)
    corpus = corpus or Corpus.load(config.corpus)
    moe_cfg = moe_config_for(config, corpus_domains(corpus, config.domain_field))
    if moe_cfg is None:  # the library trainer (retrievers/dense_fit.py)
        return _fit_library(config, Path(out), resume, overwrite, corpus)
    _refuse_scale_for_moe(config)
    data = build_training_data(config, corpus)
    if (config.workers > 1 or config.gpus_per_worker) and worker is None:
        from core.training.ray_train import launch
        metrics = launch("retrievers.dense_train:moe_ray_entry", config, out, "retriever:dense", resume, overwrite)
        return metrics, load_dense_run(out)
    evaluator = (DevEvaluator(corpus, config.dev, config.eval_docs, config.eval_seed, config.words_per_passage,
                              config.domain_field, config.eval_batch_size,
                              bm25_index=_bm25_index_for(config, corpus) if config.eval_bm25_docs else None,
                              bm25_docs=config.eval_bm25_docs) if config.dev else None)

    from core.training.ray_train import open_run, worker_device
    device = str(pick_device(worker_device(config, worker)))
    model, st, base_params, base_fingerprint = build_model(config, corpus_domains(corpus, config.domain_field), device)
    run, resume = open_run(out, config, "retriever:dense", resume, overwrite, worker)
    mnrl = MultipleNegativesRankingLoss(model, scale=config.scale)

    if moe_cfg is not None:
        sampler = DomainBatchSampler(data.domains[0], config.batch_size, config.seed)
    else:
        sampler = EpochSampler(len(data.pairs), config.batch_size, config.seed)
    columns = [data.queries, data.positives] + ([data.negatives] if data.negatives is not None else [])

    def batch_for_step(step: int):
        idx = dedupe_batch(data.pairs, sampler.indices(step))
        feats = []
        for col, texts in enumerate(columns):
            f = st.preprocess([texts[i] for i in idx])
            f = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in f.items()}
            if moe_cfg is not None:
                f[EXPERT_IDS] = model.domain_ids([data.domains[col][i] for i in idx]).to(device)
            feats.append(f)
        return feats

    def loss_fn(feats):
        if moe_cfg is None:
            loss = mnrl(feats, None)
            return loss, {"mnrl": float(loss.detach()), "batch": float(len(feats[0]["input_ids"]))}
        q = model(feats[0])
        docs = embed_columns(model, feats[1:], separate_first=False)
        rank_loss = mnrl.compute_loss_from_embeddings([q["sentence_embedding"], *docs], None)
        r_loss, r_acc = router_loss(q["router_logits"], feats[0][EXPERT_IDS])
        loss = rank_loss + config.router_weight * r_loss
        return loss, {"mnrl": float(rank_loss.detach()), "router_ce": float(r_loss.detach()), "router_acc": r_acc,
                      "batch": float(len(feats[0]["input_ids"]))}

    dev_encoder = DenseEncoder(model, "training", config.eval_batch_size)

    def evaluate() -> dict[str, float]:
        return evaluator.evaluate(dev_encoder, oracle_also=moe_cfg is not None)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = {"encoder_params": base_params, "trainable_pct_of_encoder": 100.0 * trainable / base_params,
             "peft": config.peft, "lr": config.lr, **data.report,
             **(evaluator.describe() if evaluator else {}),
             "moe": moe_cfg.to_dict() if moe_cfg is not None else None}
    loop = TrainLoop(run, model, config, batch_for_step, loss_fn, evaluate if evaluator else None,
                     save_final=lambda path: save_run_weights(model, st, config, path, base_fingerprint),
                     trainable_state=lambda: _trainable_state(model), resume=resume, extra_metrics=extra)
    t0 = time.perf_counter()
    metrics = loop.fit()
    metrics["train_seconds"] = round(time.perf_counter() - t0, 2)
    if evaluator is not None:
        metrics["dev_by_domain"] = evaluator.last_by_domain
        if moe_cfg is not None:
            metrics["dev_by_domain_oracle"] = evaluator.last_by_domain_oracle
    if worker is None or worker.is_main:
        run.write_metrics(metrics)
    model.eval()
    return metrics, model


def moe_ray_entry(config: DenseTrainConfig, out: Path, worker: Any) -> None:
    """One Ray Train worker of the MoE path (core/training/ray_train.py)."""
    fit_dense(config, out, worker=worker)
