"""Corpus transforms stream the corpus: the draws over row positions are the draws the list-based versions made,
row-level transforms read the file as they go, and the corpus errors are those of `Corpus.load`."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import core.io
from core.errors import InputError
from eval.corpus_variants import JsonlRows, derive_from_rows, is_streaming, new_domain, perturb, subsample
from eval.transforms import TRANSFORMS, counterfactual_substitute
from rag.cli import main
from tests.conftest import write_jsonl

TOPICS = ["Geography", "Biology", "Technology"]


def _docs(n: int = 60) -> list[dict]:
    return [{"id": f"d{i}", "title": f"Name{i} Term", "domain": TOPICS[i % 3],
             "text": f"Name{i} Term is a thing born in {1900 + i} in City{i % 7}. It has many parts and pieces. "
                     f"Another sentence about item {i} here.\n\nA second paragraph on {i}. With two sentences."}
            for i in range(n)]


def _questions(ids) -> list[dict]:
    return [{"id": f"q{i}", "input": f"When was Name{i} Term born?",
             "output": [{"answer": str(1900 + i), "provenance": [{"wikipedia_id": f"d{i}"}]}]} for i in ids]


def _ids(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "src" / "corpus.jsonl", _docs())


def test_subsample_draws_what_a_list_of_the_other_ids_drew(tmp_path, corpus):
    tasks = write_jsonl(tmp_path / "dev.jsonl", _questions([3, 10, 41]))
    subsample(corpus, tmp_path / "out", tasks=[tasks], seed=5, sample=9)
    gold = {"d3", "d10", "d41"}
    others = [d["id"] for d in _docs() if d["id"] not in gold]
    chosen = set(random.Random(5).sample(others, 9))
    assert _ids(tmp_path / "out" / "corpus.jsonl") == [d["id"] for d in _docs() if d["id"] in gold | chosen]


def test_perturb_order_is_the_shuffle_of_the_document_list(tmp_path, corpus):
    perturb(corpus, tmp_path / "out", seed=4)
    ids = [d["id"] for d in _docs()]
    random.Random(4).shuffle(ids)
    assert _ids(tmp_path / "out" / "corpus.jsonl") == ids
    perturb(corpus, tmp_path / "kept", seed=4, doc_order=False)
    assert _ids(tmp_path / "kept" / "corpus.jsonl") == [d["id"] for d in _docs()]


def test_new_domain_keeps_what_a_list_of_the_other_ids_kept(tmp_path, corpus):
    manifest = new_domain(corpus, tmp_path / "out", seed=2, n_queries=5, max_docs=12, min_words=3)
    rows = [json.loads(line) for line in (tmp_path / "out" / "pseudo.jsonl").read_text().splitlines()]
    gold = {r["output"][0]["provenance"][0]["wikipedia_id"] for r in rows}
    assert len(gold) == 5 and [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    others = [d["id"] for d in _docs() if d["id"] not in gold]
    chosen = set(random.Random(3).sample(others, 12 - 5))
    assert _ids(tmp_path / "out" / "corpus.jsonl") == [d["id"] for d in _docs() if d["id"] in gold | chosen]
    assert manifest["stats"]["docs_in"] == 60 and manifest["stats"]["docs_out"] == 12


def test_counterfactual_streams_a_file_and_matches_the_list_version(tmp_path, corpus):
    qa = _questions(range(0, 60, 4))
    as_list, qa_list, stats_list = counterfactual_substitute(_docs(), qa, seed=1)
    assert isinstance(as_list, list) and stats_list["substituted_questions"] > 0
    streamed, qa_streamed, stats_streamed = counterfactual_substitute(JsonlRows(corpus), qa, seed=1)
    assert not isinstance(streamed, list) and list(streamed) == as_list
    assert (qa_streamed, stats_streamed) == (qa_list, stats_list)
    assert is_streaming(TRANSFORMS["counterfactual"].fn)


def test_row_level_derive_never_reads_the_corpus_into_a_list(tmp_path, corpus, monkeypatch):
    tasks = write_jsonl(tmp_path / "dev.jsonl", _questions(range(0, 60, 4)))
    expected, _, _ = counterfactual_substitute(_docs(), _questions(range(0, 60, 4)), seed=0)
    real = core.io.read_jsonl

    def refuse_the_corpus(path):
        assert Path(path).resolve() != corpus.resolve(), "the corpus was read whole"
        return real(path)

    monkeypatch.setattr(core.io, "read_jsonl", refuse_the_corpus)
    derive_from_rows("counterfactual", counterfactual_substitute, corpus, tmp_path / "a", tasks=[tasks])
    assert main(["data", "derive", "--from", str(corpus), "--transform", "counterfactual", "--qa", str(tasks),
                 "--out", str(tmp_path / "b")]) == 0
    for out in ("a", "b"):
        written = [json.loads(line) for line in (tmp_path / out / "corpus.jsonl").read_text().splitlines()]
        assert written == expected


@pytest.mark.parametrize("transform", [subsample, perturb])
def test_corpus_errors_are_those_of_corpus_load(tmp_path, transform):
    path = write_jsonl(tmp_path / "c.jsonl", [*_docs(3), {"id": "d1", "title": "again", "text": "x"}])
    with pytest.raises(InputError, match=r"duplicate id 'd1' \(first seen on line 2\)") as err:
        transform(path, tmp_path / "out")
    assert err.value.line == 4 and not (tmp_path / "out").exists()
