"""Corpus-variant transforms: topic-holdout leaks no document, perturb keeps every fact, pseudo-queries are labelled."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from core.errors import RagError
from eval.corpus_variants import (
    DERIVE_MANIFEST,
    VARIANT_TRANSFORMS,
    derive,
    gold_doc_ids,
    new_domain,
    perturb,
    resolve_part,
    split_sentences,
    subsample,
    topic_holdout,
)
from tests.conftest import write_jsonl

TOPICS = ["Geography", "Biology", "Technology", "History"]


def _docs() -> list[dict]:
    docs = []
    for i in range(24):
        topic = TOPICS[i % len(TOPICS)]
        paragraphs = [" ".join(f"Doc {i} sentence {p}.{s} says fact number {i * 100 + p * 10 + s}."
                               for s in range(1 + (i + p) % 4)) for p in range(1 + i % 3)]
        docs.append({"id": f"d{i}", "title": f"Title {i}", "text": "\n\n".join(paragraphs), "domain": topic,
                     "description": f"desc {i}"})
    docs[5]["text"] = 'He said "Stop." Then he left! Why? 3 items remain. (A note.) [Bracketed.] end without stop'
    return docs


def _questions() -> list[dict]:
    rows = []
    for i in range(24):
        rows.append({"id": f"q{i}", "input": f"question about doc {i}",
                     "output": [{"answer": f"fact {i}", "provenance": [{"wikipedia_id": f"d{i}", "title": f"Title {i}"}]}]})
    # gold spanning two topics (d0 Geography, d1 Biology): belongs to no holdout part
    rows.append({"id": "mixed", "input": "two docs", "output": [{"answer": "x", "provenance": [
        {"wikipedia_id": "d0", "title": "Title 0"}, {"wikipedia_id": "d1", "title": "Title 1"}]}]})
    return rows


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "src" / "corpus.jsonl", _docs())


@pytest.fixture
def task(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "src-tasks" / "dev.jsonl", _questions())


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_registry_has_the_transforms():
    assert {"topic-holdout", "new-domain", "perturb", "subsample"} <= set(VARIANT_TRANSFORMS)
    with pytest.raises(RagError, match="unknown corpus transform"):
        derive("nope", "x", "y")


def test_topic_holdout_leaks_no_document(corpus: Path, task: Path, tmp_path: Path):
    manifest = topic_holdout(corpus, tmp_path / "th", tasks=[task], held_out=["Geography", "History"])
    held_in, held_out = resolve_part(tmp_path / "th", "held-in"), resolve_part(tmp_path / "th", "held-out")
    docs_in, docs_out = _read(held_in["corpus"]), _read(held_out["corpus"])
    ids_in, ids_out = {d["id"] for d in docs_in}, {d["id"] for d in docs_out}
    assert not ids_in & ids_out, "a document is in both parts"
    assert ids_in | ids_out == {d["id"] for d in _docs()}
    assert {d["domain"] for d in docs_out} == {"Geography", "History"}
    assert {d["domain"] for d in docs_in} == {"Biology", "Technology"}
    # every question's gold lies wholly in its own part; the two-topic question is dropped and counted
    for part, ids in ((held_in, ids_in), (held_out, ids_out)):
        rows = _read(part["tasks"]["dev"])
        assert rows and all(gold_doc_ids(r) <= ids for r in rows)
    q_in, q_out = (_read(p["tasks"]["dev"]) for p in (held_in, held_out))
    assert {r["id"] for r in q_in} | {r["id"] for r in q_out} == {f"q{i}" for i in range(24)}
    assert manifest["stats"]["dropped_questions"]["dev"]["mixed_topics"] == 1
    assert manifest["parts"]["held-out"]["topics"] == ["Geography", "History"]
    assert (tmp_path / "th" / DERIVE_MANIFEST).exists()


def test_topic_holdout_default_choice_is_deterministic(corpus: Path, task: Path, tmp_path: Path):
    a = topic_holdout(corpus, tmp_path / "a", tasks={"dev": task}, fraction=0.5, seed=3)
    b = topic_holdout(corpus, tmp_path / "b", tasks={"dev": task}, fraction=0.5, seed=3)
    assert a["options"]["held_out"] == b["options"]["held_out"] and len(a["options"]["held_out"]) == 2
    with pytest.raises(RagError, match="unknown topics"):
        topic_holdout(corpus, tmp_path / "c", held_out=["Nope"])
    assert not (tmp_path / "c").exists()


def test_perturb_keeps_every_fact(corpus: Path, task: Path, tmp_path: Path):
    manifest = perturb(corpus, tmp_path / "p", tasks=[task], seed=0)
    part = resolve_part(tmp_path / "p")
    before = {d["id"]: d for d in _docs()}
    after = _read(part["corpus"])
    assert len(after) == len(before) and {d["id"] for d in after} == set(before)
    for doc in after:
        orig = before[doc["id"]]
        assert Counter(split_sentences(doc["text"])) == Counter(split_sentences(orig["text"])), doc["id"]
        assert {k: v for k, v in doc.items() if k != "text"} == {k: v for k, v in orig.items() if k != "text"}
    assert [d["id"] for d in after] != list(before), "document order unchanged"
    assert sum(d["text"] != before[d["id"]]["text"] for d in after) >= 5, "texts barely changed"
    assert manifest["stats"]["docs_text_changed"] >= 5
    # ids kept: the task file is valid unchanged
    assert part["tasks"]["dev"].read_text(encoding="utf-8") == task.read_text(encoding="utf-8")
    again = perturb(corpus, tmp_path / "p2", tasks=[task], seed=0)
    assert _read(resolve_part(tmp_path / "p2")["corpus"]) == after and again["stats"] == manifest["stats"]
    perturb(corpus, tmp_path / "p3", seed=1)
    assert _read(resolve_part(tmp_path / "p3")["corpus"]) != after


def test_split_sentences_round_trips():
    text = 'He said "Stop." Then he left! Why? 3 items remain. (A note.) [Bracketed.] end without stop'
    sentences = split_sentences(text)
    assert sentences[0] == 'He said "Stop."' and sentences[-1] == "[Bracketed.] end without stop"
    assert split_sentences(" ".join(sentences)) == sentences
    assert split_sentences("One.\n\nTwo.  Three.") == ["One.", "Two.", "Three."]


def test_new_domain_pseudo_queries_are_labelled(tmp_path: Path):
    docs = [{"id": f"f{i}", "title": f"term{i}", "aliases": [f"alias{i}"], "domain": "computing",
             "text": f"<language> term{i} is a programming tool number {i} used by alias{i} experts widely. More text."}
            for i in range(30)]
    docs.append({"id": "short", "title": "x", "text": "Too short."})
    corpus = write_jsonl(tmp_path / "foldoc" / "corpus.jsonl", docs)
    manifest = new_domain(corpus, tmp_path / "nd", n_queries=10, max_docs=15, seed=0)
    part = resolve_part(tmp_path / "nd")
    assert part["pseudo"] is True and manifest["parts"]["default"]["pseudo"] is True
    rows = _read(part["tasks"]["pseudo"])
    kept = {d["id"] for d in _read(part["corpus"])}
    assert len(rows) == 10 and len(kept) == 15
    for row in rows:
        assert row["meta"]["pseudo"] is True
        (gold,) = gold_doc_ids(row)
        assert gold in kept and gold != "short"
        n = gold[1:]
        assert f"term{n}" not in row["input"] and f"alias{n}" not in row["input"] and "[TERM]" in row["input"]
        assert "<language>" not in row["input"]
        assert row["output"][0]["answer"] == f"term{n}"


def test_subsample_keeps_gold(corpus: Path, task: Path, tmp_path: Path):
    small = write_jsonl(tmp_path / "t" / "few.jsonl", [_questions()[3], _questions()[7]])
    manifest = subsample(corpus, tmp_path / "s", tasks=[small], sample=4, seed=0)
    ids = {d["id"] for d in _read(resolve_part(tmp_path / "s")["corpus"])}
    assert {"d3", "d7"} <= ids and len(ids) == 6
    assert manifest["stats"]["questions_with_missing_gold"] == {"few": 0}


def test_resolve_part_reads_plain_folders(corpus: Path, task: Path):
    resolved = resolve_part(corpus.parent)
    assert resolved["corpus"] == corpus and resolved["tasks"] == {} and resolved["pseudo"] is False
