"""The disk-backed corpus of `Corpus.load` and the memory-flat `validate_corpus`: same documents, same errors."""
from __future__ import annotations

import json
import os
import pickle

import pytest

import core.corpus as corpus_mod
from core.corpus import Corpus, DocumentFile, Passage, iter_documents, split_passages, validate_corpus
from core.errors import InputError
from tests.conftest import SMALL_DOCS, write_jsonl

ROWS = [
    {"id": "a", "title": "Alpha", "text": "first " * 150, "domain": "X",
     "anchors": [{"text": "b", "title": "Beta", "paragraph": 0, "start": 0, "end": 1}]},
    {"_id": "b", "title": "Beta", "text": "beir row"},
    {"id": "c", "contents": "Gamma\nPyserini body"},
    {"wikipedia_id": 7, "wikipedia_title": "Kilt", "text": ["Kilt", "p1", "p2"]},
    {"id": "e", "title": "Alpha", "text": "same title as a", "extra_field": [1, 2]},
]


@pytest.fixture
def mixed(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in ROWS]
    lines.insert(2, "   ")  # blank lines are skipped, as before
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return path


def test_load_is_disk_backed_and_reads_the_same_documents(mixed):
    corpus = Corpus.load(mixed)
    expected = [doc for _, doc in iter_documents(mixed)]
    in_memory = Corpus(expected)
    assert isinstance(corpus.documents, DocumentFile)
    assert len(corpus) == len(corpus.documents) == 5
    assert list(corpus) == list(corpus.documents) == expected
    assert [corpus.documents[i] for i in range(5)] == expected
    assert corpus.documents[-1] == expected[-1] and corpus.documents[1:4] == expected[1:4]
    assert corpus.documents[::-2] == expected[::-2]
    with pytest.raises(IndexError):
        corpus.documents[5]
    for doc in expected:
        assert doc.id in corpus and corpus.get(doc.id) == doc == in_memory.get(doc.id)
        assert corpus.get(doc.id).extra == doc.extra and corpus.get(doc.id).anchors == doc.anchors
    assert "zz" not in corpus and 7 not in corpus
    with pytest.raises(KeyError):
        corpus.get("zz")
    assert corpus.by_title() == in_memory.by_title() and corpus.by_title()["Alpha"].id == "e"
    assert corpus.passages(20, 10) == in_memory.passages(20, 10)
    assert all(isinstance(p, Passage) for p in split_passages(corpus.documents))
    assert corpus.checksum == corpus_mod.file_checksum(mixed) and corpus.path == mixed
    assert corpus.documents.nbytes() == 12 * len(corpus)  # uint32 offsets below 4 GB, uint64 keys


def test_in_memory_corpus_still_built_from_a_list():
    docs = [corpus_mod.Document(r["id"], r["title"], r["text"]) for r in SMALL_DOCS]
    corpus = Corpus(docs)
    assert corpus.documents is docs and corpus.get("d2") is docs[1] and "d9" not in corpus and len(corpus) == 6


def _write(path, rows_or_lines):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows_or_lines),
                    encoding="utf-8")
    return path


def _errors(path):
    out = []
    for load in (validate_corpus, Corpus.load):
        with pytest.raises(InputError) as err:
            load(path)
        out.append(err.value)
    return out


def test_duplicate_names_both_lines(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"id": "a", "title": "A", "text": "x"}, "", {"id": "b", "title": "B", "text": "x"},
                                         {"id": "c", "title": "C", "text": "x"}, {"id": "b", "title": "B2", "text": "y"},
                                         {"id": "a", "title": "A2", "text": "y"}])
    for err in _errors(path):
        assert str(err) == f"{path}, line 5, field 'id': duplicate id 'b' (first seen on line 3)"


def test_first_error_in_file_order_wins(tmp_path):
    dup_then_bad = _write(tmp_path / "a.jsonl", [{"id": "a", "title": "A", "text": "x"}, {"id": "a", "title": "A", "text": "x"},
                                                 {"id": "b", "title": "B"}])
    for err in _errors(dup_then_bad):
        assert err.line == 2 and "duplicate id 'a' (first seen on line 1)" in str(err)
    bad_then_dup = _write(tmp_path / "b.jsonl", [{"id": "a", "title": "A", "text": "x"}, {"id": "b", "title": "B"},
                                                 {"id": "a", "title": "A", "text": "x"}])
    for err in _errors(bad_then_dup):
        assert err.line == 2 and err.field == "text"
    bad_json_after_dup = _write(tmp_path / "c.jsonl", [{"id": "a", "title": "A", "text": "x"}, {"id": "a", "title": "A", "text": "x"},
                                                       "{not json"])
    for err in _errors(bad_json_after_dup):
        assert err.line == 2 and err.field == "id"


def test_hash_collisions_are_confirmed_against_the_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "id_hash", lambda doc_id, nbytes=8: 42)  # every id shares one hash
    rows = [{"id": f"d{i}", "title": f"T{i}", "text": "x"} for i in range(20)]
    path = _write(tmp_path / "c.jsonl", rows)
    assert validate_corpus(path) == 20
    corpus = Corpus.load(path)
    assert [corpus.get(f"d{i}").title for i in (19, 0, 7)] == ["T19", "T0", "T7"] and "d20" not in corpus
    _write(path, [*rows, {"id": "d3", "title": "again", "text": "x"}])
    for err in _errors(path):
        assert err.line == 21 and "duplicate id 'd3' (first seen on line 4)" in str(err)


def test_a_file_changed_after_loading_is_refused(tmp_path):
    path = _write(tmp_path / "c.jsonl", SMALL_DOCS)
    corpus = Corpus.load(path)
    assert corpus.get("d1").title == "Paris"
    _write(path, [{**SMALL_DOCS[0], "title": "Changed"}, *SMALL_DOCS[1:]])
    os.utime(path, ns=(1, 1))
    with pytest.raises(InputError, match="changed on disk since it was loaded") as err:
        corpus.get("d2")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="changed on disk"):
        list(corpus)
    path.unlink()
    with pytest.raises(InputError, match="gone since it was loaded"):
        corpus.documents[3]


def test_pickles_without_its_descriptor(tmp_path):
    corpus = Corpus.load(write_jsonl(tmp_path / "c.jsonl", SMALL_DOCS))
    corpus.get("d4")
    copy = pickle.loads(pickle.dumps(corpus))
    assert copy.get("d4") == corpus.get("d4") and list(copy) == list(corpus)


def test_validate_counts_and_refuses_empty(tmp_path):
    assert validate_corpus(write_jsonl(tmp_path / "c.jsonl", SMALL_DOCS)) == len(SMALL_DOCS)
    empty = _write(tmp_path / "e.jsonl", ["", "  "])
    for err in _errors(empty):
        assert "corpus is empty" in str(err)


def test_more_than_one_block_of_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "CHUNK", 8)
    rows = [{"id": f"d{i}", "title": f"T{i}", "text": f"text {i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    assert validate_corpus(path) == 50
    corpus = Corpus.load(path)
    assert [corpus.get(f"d{i}").text for i in range(49, -1, -7)] == [f"text {i}" for i in range(49, -1, -7)]
    write_jsonl(path, [*rows, rows[30]])
    for err in _errors(path):
        assert err.line == 51 and "first seen on line 31" in str(err)
