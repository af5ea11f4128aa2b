"""Training examples for the dense retriever: (query, positive document[, hard negative]) pairs.

Two sources:

* questions: a KILT file (``input`` -> gold provenance ``wikipedia_id``). The first gold page found in
  the corpus is the positive; every gold page of the question is barred from being a negative.
  Examples none of whose gold pages is in the corpus are skipped and counted; if none remain that is
  an error.
* pseudo-queries (an inverse cloze task): a sentence of a document is the query and the rest of the
  document the positive, so a corpus without questions can still be tuned. Documents are sampled
  without replacement, seeded; a one-sentence document keeps its whole text as the positive.

Positives and negatives are written the way the index encodes passages (``title: text``, the first
``words_per_passage`` words), so training sees what retrieval sees. Hard negatives come from BM25: the
best-ranked document that is not a gold page of the query.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.corpus import Corpus, Document
from core.errors import InputError, RagError
from core.io import iter_jsonl

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


@dataclass(frozen=True)
class TrainPair:
    """One training example; ``positive_text`` overrides the document text (pseudo-queries)."""
    query: str
    positive_id: str
    gold_ids: tuple[str, ...]
    source: str                       # "question" | "pseudo"
    domain: str | None = None
    positive_text: str | None = None
    negative_id: str | None = None
    example_id: str = ""


@dataclass
class PairReport:
    """What happened to a training file: how many examples were used and how many skipped (and why)."""
    path: str
    examples: int = 0
    used: int = 0
    skipped_no_gold_in_corpus: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "examples": self.examples, "used": self.used,
                "skipped_no_gold_in_corpus": self.skipped_no_gold_in_corpus,
                "skipped_ids_sample": self.skipped_ids[:10]}

    def summary(self) -> str:
        return (f"{self.path}: {self.used} of {self.examples} examples used; {self.skipped_no_gold_in_corpus} "
                f"skipped because none of their gold pages is in the corpus")


def doc_domain(doc: Document, domain_field: str = "domain") -> str | None:
    """The document's domain under ``domain_field`` (``domain`` or any extra corpus field)."""
    value = doc.domain if domain_field == "domain" else doc.extra.get(domain_field)
    return None if value is None else str(value)


def passage_text(title: str, text: str, words_per_passage: int = 100) -> str:
    """What the index encodes for the first passage of a document (index/dense_build._encode_text)."""
    body = " ".join(text.split()[:words_per_passage])
    return f"{title}: {body}" if title else body


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def _gold_ids(row: dict[str, Any]) -> list[str]:
    ids: list[str] = []
    for output in row.get("output") or []:
        if not isinstance(output, dict):
            continue
        for prov in output.get("provenance") or []:
            if isinstance(prov, dict) and prov.get("wikipedia_id") is not None:
                gid = str(prov["wikipedia_id"]).strip()
                if gid not in ids:
                    ids.append(gid)
    return ids


def question_pairs(path: str | Path, corpus: Corpus, domain_field: str = "domain",
                   require: bool = True) -> tuple[list[TrainPair], PairReport]:
    """Pairs from a KILT file; raises InputError if no example has a gold page in the corpus."""
    report = PairReport(str(path))
    pairs: list[TrainPair] = []
    for line, row in iter_jsonl(path):
        if not isinstance(row.get("input"), str) or not row["input"].strip():
            raise InputError("missing or empty", path, line, "input")
        report.examples += 1
        qid = str(row.get("id", line)).strip()
        gold = _gold_ids(row)
        in_corpus = [g for g in gold if g in corpus]
        if not in_corpus:
            report.skipped_no_gold_in_corpus += 1
            report.skipped_ids.append(qid)
            continue
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        domain = meta.get(domain_field) if meta else None
        if domain is None:
            domain = doc_domain(corpus.get(in_corpus[0]), domain_field)
        pairs.append(TrainPair(row["input"].strip(), in_corpus[0], tuple(gold), "question",
                               None if domain is None else str(domain), example_id=qid))
    report.used = len(pairs)
    if require and not pairs:
        raise InputError(f"no usable training examples: all {report.examples} examples were skipped because "
                         f"none of their gold pages (provenance wikipedia_id) is in the corpus "
                         f"{corpus.path or ''}".rstrip(), path)
    return pairs, report


def pseudo_query_pairs(corpus: Corpus, n: int, seed: int = 0, domain_field: str = "domain",
                       min_words: int = 4, words_per_passage: int = 100) -> list[TrainPair]:
    """Up to ``n`` (sentence -> rest of its document) pairs from distinct, randomly chosen documents."""
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(corpus.documents))
    pairs: list[TrainPair] = []
    for i in order.tolist():
        doc = corpus.documents[i]
        window = " ".join(doc.text.split()[:words_per_passage])
        sentences = split_sentences(window)
        candidates = [j for j, s in enumerate(sentences) if len(s.split()) >= min_words]
        if not candidates:
            continue
        j = candidates[int(rng.integers(len(candidates)))]
        rest = " ".join(s for k, s in enumerate(sentences) if k != j) if len(sentences) > 1 else window
        pairs.append(TrainPair(sentences[j], doc.id, (doc.id,), "pseudo", doc_domain(doc, domain_field),
                               positive_text=passage_text(doc.title, rest, words_per_passage),
                               example_id=f"pseudo:{doc.id}"))
        if len(pairs) == n:
            break
    return pairs


def mine_bm25_negatives(pairs: Sequence[TrainPair], bm25_index: str | Path, corpus: Corpus, depth: int = 20,
                        seed: int = 0, batch_size: int = 256) -> tuple[list[TrainPair], dict[str, int]]:
    """Give each pair the best BM25 document that is none of its gold pages.

    A query for which BM25 finds no such document (no shared term) gets a random non-gold document
    instead (seeded), so every example has a third column; the counts say how often that happened.
    """
    from retrievers.bm25 import BM25Retriever

    retriever = BM25Retriever(bm25_index)
    rng = np.random.default_rng(seed)
    out: list[TrainPair] = []
    stats = {"bm25": 0, "random": 0}
    ids = [d.id for d in corpus.documents]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rankings = retriever.retrieve([p.query for p in chunk], k=depth)
        for pair, hits in zip(chunk, rankings):
            barred = set(pair.gold_ids) | {pair.positive_id}
            negative = next((h.doc_id for h in hits if h.doc_id not in barred and h.doc_id in corpus), None)
            if negative is None:
                while True:
                    negative = ids[int(rng.integers(len(ids)))]
                    if negative not in barred or len(ids) <= len(barred):
                        break
                stats["random"] += 1
            else:
                stats["bm25"] += 1
            out.append(replace(pair, negative_id=negative))
    return out, stats


def positive_of(pair: TrainPair, corpus: Corpus, words_per_passage: int = 100) -> str:
    if pair.positive_text is not None:
        return pair.positive_text
    doc = corpus.get(pair.positive_id)
    return passage_text(doc.title, doc.text, words_per_passage)


def document_text(doc_id: str, corpus: Corpus, words_per_passage: int = 100) -> str:
    doc = corpus.get(doc_id)
    return passage_text(doc.title, doc.text, words_per_passage)


def dedupe_batch(pairs: Sequence[TrainPair], indices: Sequence[int]) -> list[int]:
    """Drop examples that would turn another example's positive into a false in-batch negative.

    Greedy in batch order: an example is kept when its positive is not already a kept positive or
    negative and its negative is not a kept positive (several questions share one gold page).
    """
    positives: set[str] = set()
    negatives: set[str] = set()
    kept: list[int] = []
    for i in indices:
        pair = pairs[i]
        gold = set(pair.gold_ids) | {pair.positive_id}
        if gold & positives or gold & negatives or pair.negative_id in positives:
            continue
        kept.append(i)
        positives |= gold
        if pair.negative_id is not None:
            negatives.add(pair.negative_id)
    return kept


class DomainBatchSampler:
    """Domain-homogeneous batches for any step, reproducibly (so in-batch negatives stay in-domain).

    Epoch e: inside each domain the examples are permuted with (seed + e) and cut into batches of
    ``batch_size`` (a last partial batch of at least 2 examples is kept); then the batches of all
    domains are shuffled together. Examples without a domain form their own group.
    """

    def __init__(self, domains: Sequence[str | None], batch_size: int, seed: int) -> None:
        if not domains:
            raise RagError("no training examples")
        self.seed, self.batch_size = seed, batch_size
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(domains):
            groups.setdefault("" if d is None else d, []).append(i)
        self.groups = [groups[k] for k in sorted(groups)]
        self.per_epoch = len(self._epoch(0))
        if self.per_epoch == 0:
            raise RagError("every domain has fewer than 2 training examples: no domain batch can be formed")

    def _epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + epoch)
        batches: list[list[int]] = []
        for members in self.groups:
            order = [members[j] for j in rng.permutation(len(members)).tolist()]
            for s in range(0, len(order), self.batch_size):
                chunk = order[s:s + self.batch_size]
                if len(chunk) >= 2:
                    batches.append(chunk)
        return [batches[j] for j in rng.permutation(len(batches)).tolist()]

    def indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.per_epoch)
        return self._epoch(epoch)[within]
