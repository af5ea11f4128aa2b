"""What both dense trainers share: the config, the training examples, the dev evaluator and the model to tune.

retrievers/dense_fit.py (sentence-transformers' trainer) and retrievers/dense_train.py (the entry point, and the
toolkit loop that MoE heads still use) both build on these; kept apart so neither imports the other's loop.

Dev evaluation during training searches the dev questions against a pool of documents: every dev
gold page, optionally each dev question's top ``--eval-bm25-docs`` BM25 documents, plus ``--eval-docs``
documents sampled once (seeded, independent of the training seed); ``--eval-docs 0`` uses the whole
corpus. Encoding all of vital10k takes minutes on a 2-core CPU, hence the pool. KILT R-precision and
recall@5/20 (official definitions).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import opt
from core.errors import RagError
from core.training.hf import ScaleConfig
from retrievers.dense_run import load_base

logger = logging.getLogger(__name__)

EVAL_KS = (5, 20)


@dataclass
class DenseTrainConfig(ScaleConfig):
    corpus: str = opt("", "corpus JSONL or a folder holding corpus.jsonl")
    train: str = opt("", "KILT JSONL of training questions (gold pages in the corpus)")
    dev: str | None = opt(None, "KILT JSONL evaluated every --eval-every steps (Rprec, recall@5/20)")
    encoder: str = opt("minilm", "base sentence-transformers model (alias or folder)", check="model")
    peft: str = opt("iaa", "PEFT method (core/peft registry)", check="peft")
    rank: int | None = opt(None, "bottleneck / LoRA rank, or prefix length (method default if unset)", min=1)
    peft_options: str = opt("", "PEFT method options KEY=VALUE,... (e.g. placement=houlsby,init=small,first_c=use "
                                "for iaa/adapter; docs/peft-backbones.md)")
    pseudo_queries: int = opt(0, "add N (sentence -> its document) pairs built from the corpus", min=0)
    hard_negatives: str = opt("bm25", "bm25 | none", choices=("bm25", "none"))
    bm25_index: str | None = opt(None, "an existing BM25 index folder of the corpus (else built and cached)")
    negative_depth: int = opt(20, "BM25 hard negatives are drawn from this many top hits", min=1)
    max_seq_length: int = opt(128, "tokens per query or passage", min=1)
    words_per_passage: int = opt(100, "words of a page used as its positive passage", min=1)
    positives: str = opt("provenance", "provenance: the positive is the passage window (--words-per-passage "
                                       "words, windows 4/5 of that apart) of the gold page that holds the provenance's paragraphs "
                                       "(KILT start/end_paragraph_id), the page's first window where no paragraph "
                                       "is named; first: always the page's first window",
                         choices=("provenance", "first"))
    mine_workers: int = opt(1, "Ray Data actors mining the BM25 hard negatives (1 = in this process; the same "
                               "negatives either way)", min=1)
    scale: float = opt(20.0, "MultipleNegativesRankingLoss scale (1 / temperature)", gt=0, finite=True)
    batch_sampler: str = opt("no_duplicates", "no_duplicates: no two examples of a batch share a text (a duplicated "
                                              "gold page is never its own question's negative); random: plain "
                                              "shuffled batches", choices=("no_duplicates", "random"))
    mini_batch_size: int = opt(0, "0 = off; N = GradCache (CachedMultipleNegativesRankingLoss): the loss of the whole "
                                  "batch, embedded N texts at a time, so a large batch fits the memory of a small one "
                                  "(--gradient-accumulation-steps instead averages smaller batches, with fewer "
                                  "in-batch negatives)", min=0)
    moe_experts: int = opt(0, "0 = no MoE; N = one head per domain (N = number of domains); 1 = shared head",
                           min=0)
    domain_field: str = opt("domain", "corpus field naming a document's domain")
    moe_hidden: int = opt(64, "hidden width of each expert head", min=1)
    moe_ffn: bool = opt(False, "also give each expert a copy of a middle-layer FFN")
    router_weight: float = opt(1.0, "weight of the router's domain-label loss", min=0, finite=True)
    eval_docs: int = opt(1500, "dev pool: the dev gold pages plus this many sampled documents (0 = whole corpus)",
                         min=0)
    eval_bm25_docs: int = opt(0, "also put each dev question's top-k BM25 documents in the dev pool", min=0)
    eval_seed: int = opt(0, "seed of the dev pool sample (independent of --seed)", min=0, max=2**32 - 1)
    eval_batch_size: int = opt(64, "texts per dev encode batch", min=1)


# ---------------------------------------------------------------------------------------------- models

def corpus_domains(corpus, domain_field: str) -> list[str]:
    from retrievers.training_pairs import doc_domain
    return sorted({d for d in (doc_domain(doc, domain_field) for doc in corpus.documents) if d is not None})


def moe_config_for(config: DenseTrainConfig, domains: list[str]):
    from retrievers.moe import MoEConfig

    if config.moe_experts <= 0:
        return None
    if not domains:
        raise RagError(f"--moe-experts: the corpus has no '{config.domain_field}' field to route by")
    if config.moe_experts not in (1, len(domains)):
        raise RagError(f"--moe-experts {config.moe_experts}: the corpus has {len(domains)} domains in field "
                       f"'{config.domain_field}' ({', '.join(domains)}); use {len(domains)} (one expert per domain) "
                       f"or 1 (a single shared head)")
    return MoEConfig(domains=domains, hidden=config.moe_hidden, shared_head=config.moe_experts == 1,
                     expert_ffn=config.moe_ffn)


# ---------------------------------------------------------------------------------------------- dev eval

class DevEvaluator:
    """KILT Rprec / recall@k of dev questions against a fixed pool of documents (see the module doc)."""

    def __init__(self, corpus, dev_path: str | Path, eval_docs: int = 1500, seed: int = 0,
                 words_per_passage: int = 100, domain_field: str = "domain", batch_size: int = 64,
                 ks: Sequence[int] = EVAL_KS, bm25_index: str | Path | None = None, bm25_docs: int = 0) -> None:
        from core.corpus import split_passages
        from core.io import read_jsonl
        from retrievers.training_pairs import _gold_ids, doc_domain

        self.corpus, self.ks, self.batch_size = corpus, tuple(ks), batch_size
        rows = read_jsonl(dev_path)
        self.gold_rows = [r for r in rows if any(g in corpus for g in _gold_ids(r))]
        self.skipped = len(rows) - len(self.gold_rows)
        if not self.gold_rows:
            raise RagError(f"{dev_path}: none of the {len(rows)} dev examples has a gold page in the corpus")
        gold = {g for r in self.gold_rows for g in _gold_ids(r) if g in corpus}
        if bm25_docs > 0 and bm25_index is not None:  # the documents BM25 confuses with the answer
            from retrievers.bm25 import BM25Retriever
            hits = BM25Retriever(bm25_index).retrieve([r["input"] for r in self.gold_rows], k=bm25_docs)
            gold |= {h.doc_id for row in hits for h in row if h.doc_id in corpus}
        others = [d.id for d in corpus.documents if d.id not in gold]
        if 0 < eval_docs < len(others):
            pick = np.random.default_rng(seed).choice(len(others), size=eval_docs, replace=False)
            pool = gold | {others[i] for i in pick.tolist()}
        else:
            pool = gold | set(others)
        docs = [d for d in corpus.documents if d.id in pool]  # corpus order: deterministic
        self.passages = list(split_passages(docs, words_per_passage, max(1, int(words_per_passage * 0.8))))
        self.n_docs = len(docs)
        self.queries = [r["input"] for r in self.gold_rows]
        self.query_domains = [doc_domain(corpus.get(next(g for g in _gold_ids(r) if g in corpus)), domain_field)
                              for r in self.gold_rows]
        self.last_by_domain: dict[str, dict[str, float]] = {}
        self.last_by_domain_oracle: dict[str, dict[str, float]] = {}

    def describe(self) -> dict[str, Any]:
        return {"dev_questions": len(self.gold_rows), "dev_skipped_no_gold_in_corpus": self.skipped,
                "eval_pool_docs": self.n_docs, "eval_pool_passages": len(self.passages)}

    def rankings(self, encoder, oracle_also: bool = False) -> list[list[list[Any]]]:
        """Rankings of the dev questions: without query domains (router), and with the gold domain if asked."""
        from index.faiss_index import FaissIndex

        texts = [p.encode_text for p in self.passages]
        emb = encoder.encode_passage(texts, domains=[p.domain for p in self.passages], batch_size=self.batch_size)
        index = FaissIndex.create(emb.shape[1], "Flat")
        index.add(emb)
        query_sets = [encoder.encode_query(self.queries, batch_size=self.batch_size)]
        if oracle_also:
            query_sets.append(encoder.encode_query(self.queries, domains=self.query_domains,
                                                   batch_size=self.batch_size))
        return [self._search(index, q) for q in query_sets]

    def _search(self, index, q: np.ndarray) -> list[list[Any]]:
        from retrievers.base import Hit

        k = max(self.ks)
        scores, pids = index.search(q, min(len(self.passages), k * 3))
        out = []
        for row_p, row_s in zip(pids.tolist(), scores.tolist()):
            seen: dict[str, Hit] = {}
            for pid, score in zip(row_p, row_s):
                if pid < 0:
                    continue
                p = self.passages[pid]
                if p.doc_id not in seen:
                    seen[p.doc_id] = Hit(p.doc_id, p.title, float(score), p.text, pid, p.domain)
                if len(seen) == k:
                    break
            out.append(list(seen.values()))
        return out

    def score(self, rankings: list[list[Any]], subset: Sequence[int] | None = None) -> dict[str, float]:
        from eval.kilt import evaluate_kilt

        idx = list(range(len(self.gold_rows))) if subset is None else list(subset)
        guesses = [{"id": self.gold_rows[i]["id"], "output": [{"provenance": [h.provenance() for h in rankings[i]]}]}
                   for i in idx]
        result = evaluate_kilt(guesses, [self.gold_rows[i] for i in idx], ks=self.ks)["retrieval"]
        return {"Rprec": result["Rprec"], **{f"recall@{k}": result[f"recall@{k}"] for k in self.ks}}

    def _by_domain(self, rankings: list[list[Any]]) -> dict[str, dict[str, float]]:
        by: dict[str, list[int]] = {}
        for i, d in enumerate(self.query_domains):
            by.setdefault(d or "", []).append(i)
        return {d: {**self.score(rankings, idx), "n": len(idx)} for d, idx in sorted(by.items())}

    def evaluate(self, encoder, oracle_also: bool = False) -> dict[str, float]:
        """Metrics without query domains; with ``oracle_also`` also ``oracle_*`` (queries routed by gold domain)."""
        rankings = self.rankings(encoder, oracle_also)
        metrics = self.score(rankings[0])
        self.last_by_domain = self._by_domain(rankings[0])
        if oracle_also:
            metrics.update({f"oracle_{k}": v for k, v in self.score(rankings[1]).items()})
            self.last_by_domain_oracle = self._by_domain(rankings[1])
        return metrics


# ---------------------------------------------------------------------------------------------- training

def _bm25_index_for(config: DenseTrainConfig, corpus) -> Path:
    if config.bm25_index:
        path = Path(config.bm25_index)
        if not (path / "manifest.json").exists():
            raise RagError(f"--bm25-index {path}: not an index folder (no manifest.json)")
        return path
    from core.models import rag_home
    from retrievers.bm25 import build_bm25_index

    path = rag_home() / "cache" / f"bm25-{corpus.checksum.split(':')[-1][:16]}"
    if not (path / "manifest.json").exists():
        logger.info("building a BM25 index for hard negatives in %s", path)
        build_bm25_index(corpus.path, path, overwrite=True)
    return path


class TrainingData:
    """The training examples and, written on demand from the corpus, their texts.

    ``pairs`` hold queries and document ids only. ``dataset()`` streams the (query, positive[, negative]) texts
    into an Arrow-backed ``datasets.Dataset`` on disk (``Dataset.from_generator``), so no list of every text is
    held; ``queries`` / ``positives`` / ``negatives`` / ``domains`` build those lists on first use (the MoE loop
    of retrievers/dense_train.py)."""

    def __init__(self, pairs: list, corpus, words_per_passage: int, with_negatives: bool, domain_field: str,
                 report: dict[str, Any]) -> None:
        self.pairs, self.corpus, self.report = pairs, corpus, report
        self.words_per_passage, self.with_negatives, self.domain_field = words_per_passage, with_negatives, domain_field
        self._cache: dict[str, Any] = {}
        self._tmp: Any = None

    def columns(self) -> list[str]:
        return ["query", "positive", *(["negative"] if self.with_negatives else [])]

    def rows(self) -> Iterator[dict[str, str]]:
        """One {query, positive[, negative]} row per pair, in pair order."""
        from retrievers.training_pairs import document_text, positive_of

        wpp = self.words_per_passage
        for p in self.pairs:
            row = {"query": p.query, "positive": positive_of(p, self.corpus, wpp)}
            if self.with_negatives:
                row["negative"] = document_text(p.negative_id, self.corpus, wpp)
            yield row

    def dataset(self, cache_dir: str | Path | None = None):
        """The rows as an Arrow-backed ``datasets.Dataset`` written to a fresh folder (under ``cache_dir``,
        else the system temp, TMPDIR), removed when this object goes or the process ends. No shuffle here: the
        trainer's batch sampler shuffles once per epoch."""
        import tempfile
        import uuid

        from datasets import Dataset, Features, Value
        from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if "dataset" not in self._cache:
            self._tmp = tempfile.TemporaryDirectory(prefix="rag-train-pairs-", dir=cache_dir)
            features = Features({c: Value("string") for c in self.columns()})
            quiet = not are_progress_bars_disabled()
            if quiet:
                disable_progress_bars()
            try:
                self._cache["dataset"] = Dataset.from_generator(
                    self.rows, features=features, cache_dir=self._tmp.name,
                    fingerprint=uuid.uuid4().hex)  # a fresh folder, nothing to reuse; skips hashing the corpus
            finally:
                if quiet:
                    enable_progress_bars()
        return self._cache["dataset"]

    def _column(self, name: str) -> list[Any]:
        if name not in self._cache:
            self._cache[name] = [row[name] for row in self.rows()] if name != "query" else [p.query for p in self.pairs]
        return self._cache[name]

    @property
    def queries(self) -> list[str]:
        return self._column("query")

    @property
    def positives(self) -> list[str]:
        return self._column("positive")

    @property
    def negatives(self) -> list[str] | None:
        return self._column("negative") if self.with_negatives else None

    @property
    def domains(self) -> list[list[str | None]]:
        """Per column (query, positive[, negative]) the examples' domains."""
        from retrievers.training_pairs import doc_domain

        if "domains" not in self._cache:
            get, field = self.corpus.get, self.domain_field
            cols = [[p.domain for p in self.pairs], [doc_domain(get(p.positive_id), field) for p in self.pairs]]
            if self.with_negatives:
                cols.append([doc_domain(get(p.negative_id), field) for p in self.pairs])
            self._cache["domains"] = cols
        return self._cache["domains"]


def build_training_data(config: DenseTrainConfig, corpus) -> TrainingData:
    from retrievers.training_pairs import mine_bm25_negatives, pseudo_query_pairs, question_pairs

    pairs, report = question_pairs(config.train, corpus, config.domain_field, positives=config.positives,
                                   words_per_passage=config.words_per_passage)
    logger.info(report.summary())
    pseudo = pseudo_query_pairs(corpus, config.pseudo_queries, config.seed, config.domain_field,
                                words_per_passage=config.words_per_passage)
    pairs = pairs + pseudo
    info: dict[str, Any] = {"train_file": report.to_json(), "pseudo_queries": len(pseudo), "train_pairs": len(pairs),
                            "positives": {"mode": config.positives, "paragraph": report.positive_from_paragraph,
                                          "page": report.positive_from_page, "pseudo": len(pseudo)}}
    if config.hard_negatives == "bm25":
        pairs, stats = mine_bm25_negatives(pairs, _bm25_index_for(config, corpus), corpus, config.negative_depth,
                                           config.seed, workers=config.mine_workers)
        info["hard_negatives"] = stats
    elif config.hard_negatives != "none":
        raise RagError(f"--hard-negatives {config.hard_negatives!r}: choose bm25 or none")
    return TrainingData(pairs, corpus, config.words_per_passage, config.hard_negatives == "bm25",
                        config.domain_field, info)


def build_model(config: DenseTrainConfig, domains: list[str], device: str):
    """(model to train, its SentenceTransformer, base parameter count, base fingerprint), seeded by config.seed."""
    from core.peft import apply_peft, peft_config
    from core.peft.api import method_overrides
    from core.training.loop import seed_everything
    from retrievers.encoders import DenseEncoder
    from retrievers.moe import MoEEncoder
    overrides = method_overrides(config)
    moe_cfg = moe_config_for(config, domains)
    seed_everything(config.seed)  # PEFT/MoE initialisation is part of "same seed, same result"
    st = load_base(config.encoder, device, config.max_seq_length)
    base_params = sum(p.numel() for p in st.parameters())
    base_fingerprint = DenseEncoder(st, config.encoder).fingerprint()
    st = apply_peft(st, config.peft, peft_config(config.peft, **overrides))
    model = MoEEncoder(st, moe_cfg).to(device) if moe_cfg is not None else st
    return model, st, base_params, base_fingerprint
