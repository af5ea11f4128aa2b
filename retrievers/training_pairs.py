"""Training examples for the dense retriever: (query, positive document[, hard negative]) pairs.

Two sources:

* questions: a KILT file (``input`` -> gold provenance ``wikipedia_id``). The first gold page found in
  the corpus is the positive page; every gold page of the question is barred from being a negative.
  Examples none of whose gold pages is in the corpus are skipped and counted; if none remain that is
  an error. With ``positives="provenance"`` (the default) and provenance that names paragraphs
  (``start_paragraph_id`` / ``end_paragraph_id``, optionally ``start_character`` / ``end_character``), the
  positive is the passage window of that page with the largest overlap with the evidence span (ties:
  the one holding the span's start, then the earliest); otherwise, and with ``positives="first"``, it is
  the page's first window. See ``evidence_words`` for how KILT paragraph ids map onto the text.
* pseudo-queries (an inverse cloze task): a sentence of a document is the query and the rest of the
  document the positive, so a corpus without questions can still be tuned. Documents are sampled
  without replacement, seeded; a one-sentence document keeps its whole text as the positive.

Positives and negatives are written the way the index encodes passages (``title: text``, a window of
``words_per_passage`` words; negatives always the first), so training sees what retrieval sees. Hard
negatives stay page-level and come from BM25: the best-ranked document that is not a gold page of the
query, mined in batches in this process or, with ``workers > 1``, by a pool of Ray Data actors that each
open the BM25 index once; both give the same negatives (see ``mine_bm25_negatives``).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.corpus import Corpus, Document
from core.errors import InputError, RagError
from core.io import iter_jsonl

logger = logging.getLogger(__name__)

POSITIVES = ("provenance", "first")
PARAGRAPH_BREAK = "\n\n"  # how core.corpus joins a KILT page's paragraphs into Document.text

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


@dataclass(frozen=True, slots=True)
class TrainPair:
    """One training example; ``positive_text`` overrides the document text (pseudo-queries).

    ``positive_start`` is the first word (of ``Document.text.split()``) of the positive's window, and
    ``positive_from`` says where it came from: "paragraph" (gold provenance paragraphs), "page" (the first
    window) or "pseudo". Texts are not held here: ``positive_of`` writes them when asked."""
    query: str
    positive_id: str
    gold_ids: tuple[str, ...]
    source: str                       # "question" | "pseudo"
    domain: str | None = None
    positive_text: str | None = None
    negative_id: str | None = None
    example_id: str = ""
    positive_start: int = 0
    positive_from: str = "page"


@dataclass
class PairReport:
    """What happened to a training file: how many examples were used and how many skipped (and why)."""
    path: str
    examples: int = 0
    used: int = 0
    skipped_no_gold_in_corpus: int = 0
    skipped_ids: list[str] = field(default_factory=list)
    positives: str = "provenance"
    positive_from_paragraph: int = 0     # the window holding the gold provenance's paragraphs
    positive_from_page: int = 0          # the page's first window (no paragraph ids, or positives="first")
    paragraph_not_in_text: int = 0       # of the page-level ones: paragraph ids past the end of the text

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "examples": self.examples, "used": self.used,
                "skipped_no_gold_in_corpus": self.skipped_no_gold_in_corpus,
                "skipped_ids_sample": self.skipped_ids[:10],
                "positives": {"mode": self.positives, "paragraph": self.positive_from_paragraph,
                              "page": self.positive_from_page, "paragraph_not_in_text": self.paragraph_not_in_text}}

    def summary(self) -> str:
        return (f"{self.path}: {self.used} of {self.examples} examples used; {self.skipped_no_gold_in_corpus} "
                f"skipped because none of their gold pages is in the corpus; positives from provenance paragraphs: "
                f"{self.positive_from_paragraph}, page-level: {self.positive_from_page}")


def doc_domain(doc: Document, domain_field: str = "domain") -> str | None:
    """The document's domain under ``domain_field`` (``domain`` or any extra corpus field)."""
    value = doc.domain if domain_field == "domain" else doc.extra.get(domain_field)
    return None if value is None else str(value)


def passage_text(title: str, text: str, words_per_passage: int = 100) -> str:
    """What the index encodes for the first passage of a document (index/dense_build._encode_text)."""
    body = " ".join(text.split()[:words_per_passage])
    return f"{title}: {body}" if title else body


def window_text(title: str, text: str, start: int, words_per_passage: int = 100) -> str:
    """The encoded text of the window of ``text`` starting at word ``start`` (``title: words``)."""
    body = " ".join(text.split()[start:start + words_per_passage])
    return f"{title}: {body}" if title else body


def default_stride(words_per_passage: int) -> int:
    """Words between window starts: 80% of the window, as `rag index build`'s default and the dev pool use."""
    return max(1, int(words_per_passage * 0.8))


def window_starts(n_words: int, words_per_passage: int = 100, stride: int = 80) -> list[int]:
    """First words of the windows core.corpus.split_passages cuts from a text of ``n_words`` words."""
    starts = list(range(0, max(n_words - words_per_passage, 0) + 1, stride))
    if starts[-1] + words_per_passage < n_words:
        starts.append(n_words - words_per_passage)
    return starts


def best_window(starts: Sequence[int], words_per_passage: int, lo: int, hi: int) -> int:
    """The window start with the largest overlap with words [lo, hi); ties: the window holding ``lo``, then the
    earliest."""
    def key(start: int) -> tuple[int, bool, int]:
        overlap = min(hi, start + words_per_passage) - max(lo, start)
        return overlap, start <= lo < start + words_per_passage, -start
    return max(starts, key=key)


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _words_before(paragraph: str, char: int) -> int:
    """Whole or partial words of ``paragraph`` that start before character ``char`` (a word cut by ``char``
    counts as the one the span starts in, so it is not counted)."""
    char = max(0, min(char, len(paragraph)))
    n = len(paragraph[:char].split())
    if 0 < char < len(paragraph) and not paragraph[char - 1].isspace() and not paragraph[char].isspace():
        n -= 1
    return n


def evidence_words(doc: Document, provenance: dict[str, Any]) -> tuple[int, int] | None | bool:
    """Words [lo, hi) of ``doc.text.split()`` that a KILT provenance entry's paragraphs (and characters) cover.

    None when the entry names no paragraph; False when it names one the text does not have. Paragraphs are
    the blank-line (``\\n\\n``) separated parts of ``Document.text``. KILT's paragraph 0 is the page title, which
    core.corpus drops from the text when it repeats the title: then KILT paragraph p is text paragraph
    p - 1 (p = 0, the title, maps to the first paragraph: every window starts with the title). When the text
    still starts with the title, paragraph ids are used as they are. (core.corpus also drops empty
    paragraphs; ids after one of those point one paragraph too far. The KILT knowledge source has none.)
    """
    start_p = _int_or_none(provenance.get("start_paragraph_id"))
    if start_p is None or start_p < 0:
        return None
    end_p = _int_or_none(provenance.get("end_paragraph_id"))
    end_p = start_p if end_p is None or end_p < start_p else end_p
    paragraphs = doc.text.split(PARAGRAPH_BREAK)
    shift = 0 if paragraphs[0].strip() == doc.title.strip() else 1
    first, last = max(start_p - shift, 0), max(end_p - shift, 0)
    if first >= len(paragraphs):
        return False
    last = min(last, len(paragraphs) - 1)
    offsets = [0]
    for part in paragraphs:
        offsets.append(offsets[-1] + len(part.split()))
    lo, hi = offsets[first], offsets[last + 1]
    start_c = _int_or_none(provenance.get("start_character"))
    end_c = _int_or_none(provenance.get("end_character"))
    if start_c is not None:  # the word the span starts in, kept inside its paragraph
        lo = min(lo + _words_before(paragraphs[first], start_c), max(offsets[first + 1] - 1, lo))
    if end_c is not None and end_c > 0:
        cut = paragraphs[last][:end_c]
        hi = offsets[last] + len(cut.split())
    return lo, max(hi, lo + 1)


def positive_window(doc: Document, provenance: Sequence[dict[str, Any]], words_per_passage: int = 100,
                    stride: int | None = None) -> tuple[int, str]:
    """(first word of the positive's window, "paragraph" | "page" | "missing") for a gold page ``doc``.

    The first entry of ``provenance`` (entries of this page) that names paragraphs decides; "missing" is a
    page-level positive whose paragraph ids lie past the end of the text."""
    stride = stride or default_stride(words_per_passage)
    missing = False
    for prov in provenance:
        span = evidence_words(doc, prov)
        if span is None:
            continue
        if span is False:
            missing = True
            continue
        assert isinstance(span, tuple)
        starts = window_starts(len(doc.text.split()), words_per_passage, stride)
        return best_window(starts, words_per_passage, *span), "paragraph"
    return 0, "missing" if missing else "page"


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def _provenance_of(row: dict[str, Any], page: str) -> list[dict[str, Any]]:
    """The provenance entries of ``row`` (all outputs) that point to page ``page``."""
    out: list[dict[str, Any]] = []
    for output in row.get("output") or []:
        if isinstance(output, dict):
            out.extend(p for p in output.get("provenance") or []
                       if isinstance(p, dict) and p.get("wikipedia_id") is not None
                       and str(p["wikipedia_id"]).strip() == page)
    return out


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
                   require: bool = True, positives: str = "provenance", words_per_passage: int = 100,
                   stride: int | None = None) -> tuple[list[TrainPair], PairReport]:
    """Pairs from a KILT file; raises InputError if no example has a gold page in the corpus.

    ``positives``: "provenance" (the window of the positive page holding the gold paragraphs, where the
    provenance names them) or "first" (the page's first window); the report counts both kinds."""
    if positives not in POSITIVES:
        raise RagError(f"positives={positives!r}: choose one of {', '.join(POSITIVES)}")
    report = PairReport(str(path), positives=positives)
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
        doc = corpus.get(in_corpus[0])
        if domain is None:
            domain = doc_domain(doc, domain_field)
        start, origin = 0, "page"
        if positives == "provenance":
            start, origin = positive_window(doc, _provenance_of(row, in_corpus[0]), words_per_passage, stride)
        if origin == "paragraph":
            report.positive_from_paragraph += 1
        else:
            report.positive_from_page += 1
            report.paragraph_not_in_text += origin == "missing"
        pairs.append(TrainPair(row["input"].strip(), in_corpus[0], tuple(gold), "question",
                               None if domain is None else str(domain), example_id=qid, positive_start=start,
                               positive_from="paragraph" if origin == "paragraph" else "page"))
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
                               example_id=f"pseudo:{doc.id}", positive_from="pseudo"))
        if len(pairs) == n:
            break
    return pairs


def _negative_for(pair: TrainPair, index: int, hit_ids: Sequence[str], corpus: Corpus, seed: int,
                  all_ids: Callable[[], list[str]]) -> tuple[str, bool]:
    """(negative, from BM25?): the best hit that is no gold page, else a random non-gold document drawn by an
    rng seeded by (seed, example index), so the draw does not depend on batches or workers."""
    barred = set(pair.gold_ids) | {pair.positive_id}
    negative = next((h for h in hit_ids if h not in barred and h in corpus), None)
    if negative is not None:
        return negative, True
    rng = np.random.default_rng([seed, index])
    ids = all_ids()
    while True:
        negative = ids[int(rng.integers(len(ids)))]
        if negative not in barred or len(ids) <= len(barred):
            return negative, False


def _local_hits(queries: Sequence[str], bm25_index: str | Path, depth: int,
                batch_size: int) -> Iterator[tuple[int, list[str]]]:
    from retrievers.bm25 import BM25Retriever

    retriever = BM25Retriever(bm25_index)
    for start in range(0, len(queries), batch_size):
        rankings = retriever.retrieve(list(queries[start:start + batch_size]), k=depth)
        for offset, hits in enumerate(rankings):
            yield start + offset, [h.doc_id for h in hits]


class BM25Miner:
    """Ray Data callable class: opens the BM25 index once per actor; each call ranks a batch of queries and
    returns, per example index, its top ``depth`` document ids joined by tabs (ids hold no control
    characters). The choice of the negative stays on the driver, so it is the in-process one."""

    def __init__(self, bm25_index: str, depth: int) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from retrievers.bm25 import BM25Retriever

        self.retriever = BM25Retriever(bm25_index)
        self.depth = depth

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rankings = self.retriever.retrieve([str(q) for q in batch["query"]], k=self.depth)
        hits = ["\t".join(h.doc_id for h in row) for row in rankings]
        return {"i": np.asarray(batch["i"], dtype=np.int64), "hits": np.asarray(hits, dtype=object)}


def _inside_ray_worker() -> bool:
    """True in a Ray task or actor (e.g. a Ray Train worker): nested actor pools could wait forever for CPUs
    the worker group holds, so mining stays in the process there."""
    import sys
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        from ray._private.worker import WORKER_MODE, global_worker
    except ImportError:  # a Ray that moved its internals: assume the driver
        return False
    return bool(global_worker.mode == WORKER_MODE)


def _ray_hits(queries: Sequence[str], bm25_index: str | Path, depth: int, batch_size: int,
              workers: int) -> Iterator[tuple[int, list[str]]]:
    """Top ``depth`` BM25 ids per query from ``workers`` Ray Data actors (a local Ray, or the cluster of
    RAY_ADDRESS / the running session), streamed back in any order with their example index."""
    import warnings

    import pyarrow as pa

    from core.ray_runtime import ray_session

    index_dir = str(Path(bm25_index).resolve())  # actors need not share the driver's working directory
    local: dict[str, Any] = {}
    if not os.environ.get("RAY_ADDRESS"):
        local["num_cpus"] = max(os.cpu_count() or 1, workers)
    # blocks of whole batches, at least two per actor while that keeps 1-8 batches a block
    batches = -(-len(queries) // batch_size)
    rows_per_block = batch_size * max(1, min(8, batches // (2 * workers)))
    with ray_session(**local):
        import ray.data

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ray.data.DataContext.get_current()
        quiet = {k: getattr(ctx, k) for k in ("enable_progress_bars", "print_on_execution_start",
                                              "enable_auto_log_stats") if hasattr(ctx, k)}
        for k in quiet:
            setattr(ctx, k, False)
        data_logger = logging.getLogger("ray.data")
        level = data_logger.level
        data_logger.setLevel(max(logging.ERROR, level))
        try:
            blocks = [pa.table({"i": pa.array(range(lo, min(lo + rows_per_block, len(queries))), pa.int64()),
                                "query": pa.array(list(queries[lo:lo + rows_per_block]), pa.string())})
                      for lo in range(0, len(queries), rows_per_block)]
            ds = ray.data.from_arrow(blocks)
            out = ds.map_batches(BM25Miner, batch_size=batch_size, batch_format="numpy",
                                 compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                                 fn_constructor_kwargs={"bm25_index": index_dir, "depth": depth})
            try:
                for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                    for i, joined in zip(batch["i"].tolist(), batch["hits"].tolist()):
                        yield int(i), (str(joined).split("\t") if joined else [])
            except Exception as exc:
                raise RagError(f"mining BM25 hard negatives on {workers} Ray workers failed: "
                               f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
                               ) from exc
        finally:
            data_logger.setLevel(level)
            for k, v in quiet.items():
                setattr(ctx, k, v)


def mine_bm25_negatives(pairs: Sequence[TrainPair], bm25_index: str | Path, corpus: Corpus, depth: int = 20,
                        seed: int = 0, batch_size: int = 256,
                        workers: int = 1) -> tuple[list[TrainPair], dict[str, int]]:
    """Give each pair the best BM25 document that is none of its gold pages.

    A query for which BM25 finds no such document (no shared term) gets a random non-gold document
    instead, drawn with an rng seeded by (seed, example index); the counts say how often that happened.
    ``workers`` > 1 ranks the queries in batches of ``batch_size`` on that many Ray Data actors, each with
    the index opened once; the result is the in-process one (same negatives, same order). Inside a Ray
    worker (a Ray Train worker rebuilding its data) mining stays in the process.
    """
    if workers < 1:
        raise RagError(f"mine workers must be at least 1, got {workers}")
    queries = [p.query for p in pairs]
    if workers > 1 and len(pairs) > batch_size and not _inside_ray_worker():
        hits: Iterator[tuple[int, list[str]]] = _ray_hits(queries, bm25_index, depth, batch_size, workers)
    else:
        hits = _local_hits(queries, bm25_index, depth, batch_size)
    negatives: list[str | None] = [None] * len(pairs)
    stats = {"bm25": 0, "random": 0}
    ids: list[str] = []

    def all_ids() -> list[str]:  # listed only when some query needs the random fallback
        if not ids:
            ids.extend(d.id for d in corpus.documents)
        return ids

    for i, hit_ids in hits:
        negative, from_bm25 = _negative_for(pairs[i], i, hit_ids, corpus, seed, all_ids)
        negatives[i] = negative
        stats["bm25" if from_bm25 else "random"] += 1
    missing = [i for i, n in enumerate(negatives) if n is None]
    if missing:
        raise RagError(f"BM25 mining returned no ranking for {len(missing)} of {len(pairs)} examples")
    return [replace(pair, negative_id=negative) for pair, negative in zip(pairs, negatives)], stats


def positive_of(pair: TrainPair, corpus: Corpus, words_per_passage: int = 100) -> str:
    """The positive as the index encodes it: the pair's own text (pseudo-queries) or its window of the page."""
    if pair.positive_text is not None:
        return pair.positive_text
    doc = corpus.get(pair.positive_id)
    return window_text(doc.title, doc.text, pair.positive_start, words_per_passage)


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
