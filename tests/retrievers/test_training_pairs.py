"""Training pairs: positives from KILT paragraph provenance, BM25 negatives mined on Ray workers, streamed texts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.corpus import Corpus, split_passages
from retrievers.dense_parts import DenseTrainConfig, build_training_data
from retrievers.training_pairs import (
    evidence_words,
    mine_bm25_negatives,
    positive_of,
    pseudo_query_pairs,
    question_pairs,
)
from tests.retrievers.dense_fixtures import toy_questions, write_jsonl, write_toy_data


def paragraph(tag: str, n: int = 70) -> str:
    """n distinct words, all marked with `tag` (so a window shows which paragraph it holds)."""
    return " ".join(f"{tag}{i}" for i in range(n))


def kilt_page(wid: str, title: str, paragraphs: list[str]) -> dict:
    """A KILT knowledge-source row: paragraph 0 repeats the title."""
    return {"wikipedia_id": wid, "wikipedia_title": title, "text": [title + "\n", *(p + "\n" for p in paragraphs)]}


def question(qid: str, text: str, wid: str, **prov) -> dict:
    return {"id": qid, "input": text, "output": [{"answer": "x", "provenance": [{"wikipedia_id": wid, **prov}]}]}


@pytest.fixture()
def kilt(tmp_path) -> tuple[Corpus, Path]:
    corpus = write_jsonl(tmp_path / "kb.jsonl", [
        kilt_page("1", "Alpha", [paragraph("alpha"), paragraph("beta"), paragraph("gamma")]),
        kilt_page("2", "Other", [paragraph("other", 20)]),
    ])
    train = write_jsonl(tmp_path / "train.jsonl", [
        question("q3", "which gamma?", "1", start_paragraph_id=3, end_paragraph_id=3),
        question("qpage", "which alpha page?", "1"),  # no paragraph ids: the first window
        question("q2", "which beta?", "1", start_paragraph_id=2, end_paragraph_id=2),
        question("qfar", "past the end?", "1", start_paragraph_id=9, end_paragraph_id=9),
    ])
    return Corpus.load(corpus), train


def test_provenance_paragraph_3_is_in_the_positive_and_no_paragraph_ids_give_the_first_window(kilt):
    corpus, train = kilt
    pairs, report = question_pairs(train, corpus, words_per_passage=100)
    by_id = {p.example_id: p for p in pairs}
    doc = corpus.get("1")
    windows = [p.encode_text for p in split_passages([doc], 100, 80)]
    assert len(windows) == 3  # 210 words: the title paragraph was dropped, so paragraph 3 ("gamma") is the last
    third = positive_of(by_id["q3"], corpus)
    assert all(f"gamma{i}" in third.split() for i in range(70)) and third in windows
    assert by_id["q3"].positive_from == "paragraph"
    # no window holds all of paragraph 2 (words 70-139): the one with the largest overlap (words 80-179)
    assert positive_of(by_id["q2"], corpus) == windows[1]
    first = positive_of(by_id["qpage"], corpus)
    assert first == windows[0] and by_id["qpage"].positive_from == "page"
    assert positive_of(by_id["qfar"], corpus) == windows[0]  # a paragraph the text does not have: page-level
    assert (report.positive_from_paragraph, report.positive_from_page, report.paragraph_not_in_text) == (2, 2, 1)
    assert report.to_json()["positives"] == {"mode": "provenance", "paragraph": 2, "page": 2,
                                             "paragraph_not_in_text": 1}


def test_positives_first_keeps_the_first_window_for_every_question(kilt):
    corpus, train = kilt
    pairs, report = question_pairs(train, corpus, positives="first")
    first = [p.encode_text for p in split_passages([corpus.get("1")], 100, 80)][0]
    assert {positive_of(p, corpus) for p in pairs} == {first}
    assert (report.positive_from_paragraph, report.positive_from_page) == (0, 4)


def test_paragraph_ids_when_the_text_still_starts_with_the_title(tmp_path):
    """A corpus whose text keeps the title as its first paragraph: KILT ids are used as they are."""
    text = "\n\n".join(["Alpha", paragraph("alpha"), paragraph("beta"), paragraph("gamma")])
    corpus = Corpus.load(write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "title": "Alpha", "text": text}]))
    train = write_jsonl(tmp_path / "t.jsonl", [question("q", "gamma?", "1", start_paragraph_id=3, end_paragraph_id=3)])
    pairs, _ = question_pairs(train, corpus)
    assert all(f"gamma{i}" in positive_of(pairs[0], corpus).split() for i in range(70))


def test_start_and_end_characters_narrow_the_span(kilt):
    corpus, _ = kilt
    doc = corpus.get("1")
    par = paragraph("beta")
    at = par.index("beta50")
    lo, hi = evidence_words(doc, {"start_paragraph_id": 2, "end_paragraph_id": 2, "start_character": at,
                                  "end_character": at + len("beta50 beta51")})
    assert doc.text.split()[lo:hi] == ["beta50", "beta51"]
    assert evidence_words(doc, {"wikipedia_id": "1"}) is None
    assert evidence_words(doc, {"start_paragraph_id": 7}) is False


def test_mining_on_two_ray_workers_equals_mining_in_process(tmp_path):
    from retrievers.bm25 import build_bm25_index

    paths = write_toy_data(tmp_path)
    corpus = Corpus.load(paths["corpus"])
    pairs, _ = question_pairs(paths["train"], corpus)
    nowhere = write_jsonl(tmp_path / "nowhere.jsonl", [  # no term BM25 knows: the seeded random fallback
        {**toy_questions("train")[i], "id": f"zz{i}", "input": f"zzqx{i} wwvy"} for i in range(3)])
    pairs += question_pairs(nowhere, corpus)[0] + pseudo_query_pairs(corpus, 6, seed=0)
    build_bm25_index(paths["corpus"], tmp_path / "bm25")
    local, local_stats = mine_bm25_negatives(pairs, tmp_path / "bm25", corpus, batch_size=4, seed=3)
    spread, spread_stats = mine_bm25_negatives(pairs, tmp_path / "bm25", corpus, batch_size=4, seed=3, workers=2)
    assert spread == local and spread_stats == local_stats and local_stats["random"] == 3
    assert all(p.negative_id not in p.gold_ids for p in local)
    # the random fallback depends on (seed, example), not on the batches
    assert mine_bm25_negatives(pairs, tmp_path / "bm25", corpus, batch_size=7, seed=3)[0] == local


def test_streamed_dataset_holds_the_same_rows_as_the_lists(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "home"))
    paths = write_toy_data(tmp_path)
    corpus = Corpus.load(paths["corpus"])
    config = DenseTrainConfig(corpus=str(paths["corpus"]), train=str(paths["train"]), pseudo_queries=4)
    data = build_training_data(config, corpus)
    ds = data.dataset(tmp_path)
    assert ds.column_names == ["query", "positive", "negative"] and len(ds) == len(data.pairs)
    assert ds["query"] == data.queries and ds["positive"] == data.positives and ds["negative"] == data.negatives
    assert data.report["positives"] == {"mode": "provenance", "paragraph": 0, "page": len(data.pairs) - 4,
                                        "pseudo": 4}
    json.dumps(data.report)
