"""Cloze questions: year / number / name spans, never the sentence start or the title; KILT rows."""
from __future__ import annotations

import json

from rag.cli import main
from readers.cloze import BLANK, candidate_spans, cloze_questions
from tests.conftest import write_jsonl

DOCS = [
    {"id": "a", "title": "Paris", "text": "Paris is a city. It hosted the Summer Olympics in 1900 and again in 2024 "
     "with 10,500 athletes.", "domain": "Geography"},
    {"id": "b", "title": "Cat", "text": "Short one.", "domain": "Biology"},
    {"id": "c", "title": "Berlin", "text": "Berlin is where the Brandenburg Gate stands near the river Spree today.",
     "domain": "Geography"},
]


def test_candidate_spans():
    spans = {(s, t) for _, _, s, t in candidate_spans("It hosted the Summer Olympics in 1900 with 10,500 athletes.")}
    assert ("1900", "year") in spans and ("10,500", "number") in spans and ("Summer Olympics", "name") in spans
    assert not any(t == "name" and s.startswith("Berlin") for _, _, s, t in candidate_spans(
        "Berlin Wall Memorial is where the Brandenburg Gate stands.", "Berlin"))


def test_cloze_rows_are_kilt_and_deterministic():
    rows, stats = cloze_questions(DOCS, seed=1)
    again, _ = cloze_questions(DOCS, seed=1)
    assert rows == again and stats["questions"] == len(rows) == 2 and stats["no_candidate"] == 1
    for row in rows:
        out = row["output"][0]
        assert BLANK in row["input"] and out["answer"] not in row["input"].split(":", 1)[1].replace(BLANK, "")[:0] + ""
        assert row["meta"]["sentence"].replace(out["answer"], BLANK, 1) in row["input"]
        assert out["provenance"][0]["wikipedia_id"] in {"a", "c"}
    geo, _ = cloze_questions(DOCS, domains={"Biology"})
    assert geo == []


def test_cli(tmp_path):
    corpus = write_jsonl(tmp_path / "c" / "corpus.jsonl", DOCS)
    out = tmp_path / "cloze.jsonl"
    assert main(["data", "cloze", "--corpus", str(corpus.parent), "--out", str(out), "--types", "year"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["output"][0]["answer"] in {"1900", "2024"}
