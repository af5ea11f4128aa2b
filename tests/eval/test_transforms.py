"""Corpus transforms: the counterfactual substitution and `rag data derive`."""
from __future__ import annotations

import json

from eval.transforms import TRANSFORMS, answer_type, apply_substitutions, counterfactual_substitute, substitution_map
from rag.cli import main
from tests.conftest import write_jsonl

CORPUS = [
    {"id": "d1", "title": "Paris", "text": "Paris hosted the Olympics in 1900. In 1900 the Eiffel Tower was new."},
    {"id": "d2", "title": "Berlin", "text": "Berlin lies on the Spree. The Wall fell in 1989."},
    {"id": "d3", "title": "Ganges", "text": "The Ganges flows past Varanasi for 2,525 km."},
    {"id": "d4", "title": "Other", "text": "Nothing here."},
]


def qa(qid, answer, doc):
    return {"id": qid, "input": f"question {qid}?", "output": [{"answer": answer,
            "provenance": [{"wikipedia_id": doc, "title": doc}]}]}


QA = [qa("q1", "1900", "d1"), qa("q2", "1989", "d2"), qa("q3", "Spree", "d2"), qa("q4", "Varanasi", "d3"),
      qa("q5", "2,525", "d3"), qa("q6", "blue", "d1"), qa("q7", "1066", "d4"), qa("q8", "Paris", "d1")]


def test_answer_types():
    assert [answer_type(a) for a in ("1900", "2,525", "3.5", "New York City", "House of Lords", "blue",
                                     "Cupertino, California", "")] == \
        ["year", "number", "number", "name", "name", None, None, None]


def test_counterfactual_substitution():
    corpus, rows, stats = counterfactual_substitute(CORPUS, QA, seed=3)
    assert [r["id"] for r in rows] == ["q1", "q2", "q3", "q4", "q5"]
    assert stats["untyped_answer"] == 1 and stats["answer_not_in_evidence"] == 1 and stats["answer_is_title"] == 1
    new = {r["id"]: r["output"][0]["answer"] for r in rows}
    assert new["q1"] in {"1989", "1066"} and new["q3"] == "Varanasi" and new["q4"] == "Spree"
    assert answer_type(new["q5"]) == "number" and new["q5"] != "2,525"
    text = {r["id"]: r["text"] for r in corpus}
    assert "1900" not in text["d1"] and text["d1"].count(new["q1"]) == 2
    assert text["d4"] == CORPUS[3]["text"] and len(corpus) == len(CORPUS)
    assert rows[0]["meta"]["counterfactual"]["old_answer"] == "1900"
    assert CORPUS[0]["text"].startswith("Paris hosted the Olympics in 1900")  # input untouched
    assert counterfactual_substitute(CORPUS, QA, seed=3) == (corpus, rows, stats)  # deterministic
    subs = substitution_map(stats)
    assert apply_substitutions(CORPUS[0]["text"], subs["d1"]) == text["d1"]


def test_whole_words_only():
    assert apply_substitutions("In 19000 and 1900.", [("1900", "1850")]) == "In 19000 and 1850."


def test_derive_cli(tmp_path):
    corpus = write_jsonl(tmp_path / "c" / "corpus.jsonl", CORPUS)
    qa_path = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "cf"
    assert "counterfactual" in TRANSFORMS
    assert main(["data", "derive", "--from", str(corpus.parent), "--transform", "counterfactual", "--qa",
                 str(qa_path), "--out", str(out)]) == 0
    assert len((out / "corpus.jsonl").read_text().splitlines()) == 4
    assert len((out / "qa.jsonl").read_text().splitlines()) == 5
    assert json.loads((out / "stats.json").read_text())["substituted_questions"] == 5
    assert main(["data", "derive", "--from", str(corpus.parent), "--transform", "nope", "--out", str(out)]) == 2
