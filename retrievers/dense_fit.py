"""The dense bi-encoder trained by sentence-transformers' `SentenceTransformerTrainer`.

The library runs the loop; the toolkit supplies the data (questions, pseudo-queries, BM25 hard negatives:
retrievers/dense_train.py), the loss (`MultipleNegativesRankingLoss`, gathered across workers), the KILT dev
evaluator (a `SentenceEvaluator`), checkpoints without pickle and the run folder (core/training/hf.py).
Batches never hold two examples that share a text (`BatchSamplers.NO_DUPLICATES`): a duplicated gold page
would otherwise be an in-batch negative of its own question.

With `--workers N` (or `--gpus-per-worker`) the same function runs in N Ray Train workers (`TorchTrainer`,
gloo on CPU, NCCL on GPU); worker 0 writes the run folder, a restarted worker group resumes from the run
folder's last checkpoint. N workers of batch B train like one worker of batch N*B.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KIND = "retriever:dense"


def _evaluator_class() -> type:
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator

    class KiltDevEvaluator(SentenceEvaluator):
        """The toolkit's DevEvaluator (KILT Rprec, recall@5/20 on a document pool) as a SentenceEvaluator."""

        def __init__(self, dev: Any, batch_size: int) -> None:
            super().__init__()
            self.dev, self.batch_size = dev, batch_size
            self.name = "kilt-dev"
            self.primary_metric = "Rprec"

        def __call__(self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1,
                     **_: Any) -> dict[str, float]:
            from retrievers.encoders import DenseEncoder

            metrics = self.dev.evaluate(DenseEncoder(model, "training", self.batch_size))
            self.primary_metric = "Rprec"
            return self.prefix_name_to_metrics(metrics, self.name)

    return KiltDevEvaluator


def _trainer_class() -> type:
    from sentence_transformers import SentenceTransformerTrainer

    from core.training.hf import SafeCheckpoints

    class DenseTrainer(SafeCheckpoints, SentenceTransformerTrainer):
        """SentenceTransformerTrainer whose checkpoints hold only trained tensors, in safetensors + JSON."""

    return DenseTrainer


def fit_with_trainer(config: Any, out: Path, corpus: Any = None, is_main: bool = True,
                     world_size: int = 1, data: Any = None,
                     extra_callbacks: list[Any] | None = None) -> tuple[dict[str, Any], Any]:
    """Train in this process (one of `world_size` data-parallel workers); the main one writes the run."""
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from core.corpus import Corpus
    from core.training.hf import (
        RunFolderCallback,
        check_scale,
        enable_gradient_checkpointing,
        quiet_progress,
        reporter_callbacks,
        step_zero_and_end,
        train_from,
        training_arguments,
    )
    from core.training.loop import count_params, current_rss_mb, peak_rss_mb, pick_device
    from core.training.run import RunFolder
    from retrievers.dense_parts import (
        DevEvaluator,
        _bm25_index_for,
        build_model,
        build_training_data,
        corpus_domains,
    )

    corpus = corpus or Corpus.load(config.corpus)
    data = data or build_training_data(config, corpus)
    dev = (DevEvaluator(corpus, config.dev, config.eval_docs, config.eval_seed, config.words_per_passage,
                        config.domain_field, config.eval_batch_size,
                        bm25_index=_bm25_index_for(config, corpus) if config.eval_bm25_docs else None,
                        bm25_docs=config.eval_bm25_docs) if config.dev else None)
    device = str(pick_device(config.device)) if world_size == 1 else ("cuda" if config.gpus_per_worker else "cpu")
    model, st, base_params, base_fingerprint = build_model(config, corpus_domains(corpus, config.domain_field),
                                                           device)
    check_scale(config, device, st)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(st)
    train_dataset = data.dataset()  # Arrow on disk, streamed from the pairs; the sampler shuffles once per epoch
    run = RunFolder.attach(out, KIND)
    resume_from = run.latest_checkpoint()
    if resume_from is not None and is_main:
        run.truncate_curves(int(resume_from.name.split("-")[1]))
    callback = RunFolderCallback(run, evaluates=dev is not None, is_main=is_main)
    args = training_arguments(SentenceTransformerTrainingArguments, config, run.checkpoints, device,
                              batch_sampler=(BatchSamplers.NO_DUPLICATES if config.batch_sampler == "no_duplicates"
                                             else BatchSamplers.BATCH_SAMPLER), eval_on_start=dev is not None,
                              ddp_find_unused_parameters=True,  # e.g. BERT's pooler: mean pooling never uses it
                              eval_strategy="steps" if dev is not None and config.eval_every else "no")
    if config.mini_batch_size:
        loss = CachedMultipleNegativesRankingLoss(st, scale=config.scale, mini_batch_size=config.mini_batch_size,
                                                  gather_across_devices=world_size > 1)
    else:
        loss = MultipleNegativesRankingLoss(st, scale=config.scale, gather_across_devices=world_size > 1)
    trainer = _trainer_class()(model=st, args=args, train_dataset=train_dataset, loss=loss,
                               evaluator=_evaluator_class()(dev, config.eval_batch_size) if dev else None,
                               callbacks=[callback, *reporter_callbacks(config, out, is_main),
                                          *(extra_callbacks or [])])
    progress = quiet_progress(trainer)
    rss_start = current_rss_mb()
    seconds, done_steps = train_from(trainer, progress, resume_from, config.max_steps)
    dev_step0, dev_end = step_zero_and_end(callback.dev_by_step)
    trainable = sum(p.numel() for p in st.parameters() if p.requires_grad)
    metrics: dict[str, Any] = {
        **count_params(st), "encoder_params": base_params, "trainable_pct_of_encoder": 100.0 * trainable / base_params,
        "peft": config.peft, "lr": config.lr, **data.report, **(dev.describe() if dev else {}), "moe": None,
        "steps": config.max_steps, "resumed_from": config.max_steps - done_steps, "workers": world_size,
        "examples_per_step": config.batch_size * config.gradient_accumulation_steps * world_size,
        "precision": "bf16" if config.bf16 else "fp16" if config.fp16 else "fp32",
        "gradient_checkpointing": config.gradient_checkpointing,
        "seconds_per_step": seconds / max(done_steps, 1), "train_seconds": round(seconds, 2),
        "peak_rss_mb": round(max(rss_start, current_rss_mb(), peak_rss_mb()), 1),
        "peak_gpu_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None),
        "final_train": callback.train_logs, "dev_step0": dev_step0, "dev": dev_end,
        "dev_by_domain": dev.last_by_domain if dev else {}}
    if is_main:
        from retrievers.dense_export import save_dense_run
        save_dense_run(st, config, out, base_fingerprint)
        run.write_metrics(metrics)
        metrics["plots"] = [str(p) for p in run.plot()]
        run.write_metrics(metrics)
    st.eval()
    return metrics, st


def ray_entry(config: Any, out: Path, worker: Any) -> None:
    """One Ray Train worker (core/training/ray_train.py): train its shard of every batch; worker 0 writes."""
    from core.training.ray_train import fault_injection

    fit_with_trainer(config, out, is_main=worker.is_main, world_size=worker.world_size,
                     extra_callbacks=fault_injection(worker.rank, out))


def fit_on_ray(config: Any, out: Path) -> dict[str, Any]:
    """Run `fit_with_trainer` in `config.workers` Ray Train workers and return the metrics worker 0 wrote."""
    from core.training.ray_train import run_workers

    return run_workers("retrievers.dense_fit:ray_entry", config, out)
