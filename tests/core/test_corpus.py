"""Corpus formats, validation errors (file, line, field) and passage splitting."""
from __future__ import annotations

import json

import pytest

from core.corpus import Corpus, split_passages, validate_corpus
from core.errors import InputError
from tests.conftest import SMALL_DOCS, write_jsonl


def test_loads_own_format_with_domains(small_corpus):
    corpus = Corpus.load(small_corpus.parent)
    assert len(corpus) == len(SMALL_DOCS)
    assert corpus.get("d3").domain == "Biology"
    assert corpus.checksum.startswith("sha256:")


def test_reads_pyserini_beir_and_kilt_formats(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": "p1", "contents": "Title One\nBody of one."},
        {"_id": "b1", "title": "Beir", "text": "beir body"},
        {"wikipedia_id": 12, "wikipedia_title": "Kilt", "text": ["Kilt\n", "First para.", "Second para."],
         "anchors": [{"text": "x", "href": "y"}]},
    ])
    docs = {d.id: d for d in Corpus.load(path)}
    assert docs["p1"].title == "Title One" and docs["p1"].text == "Body of one."
    assert docs["b1"].title == "Beir"
    assert docs["12"].title == "Kilt" and docs["12"].text == "First para.\n\nSecond para."


@pytest.mark.parametrize("content, line, field", [
    ('{"id": "a", "title": "A", "text": "ok"}\n{"id": "b", "title": "B", "text": "ok"\n', 2, None),
    ('{"id": "a", "title": "A", "text": "ok"}\n{"id": "b", "title": "B"}\n', 2, "text"),
    ('{"id": "a", "title": "A", "text": "ok"}\n\n{"id": "b", "title": "", "text": "x"}\n', 3, "title"),
    ('{"id": "a", "title": "A", "text": "   "}\n', 1, "text"),
    ('{"id": "a", "title": "A", "text": "ok"}\n{"id": "a", "title": "B", "text": "ok"}\n', 2, "id"),
    ('["not", "an", "object"]\n', 1, None),
])
def test_bad_rows_name_file_line_and_field(tmp_path, content, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as err:
        Corpus.load(path)
    assert err.value.line == line and err.value.field == field
    assert str(path) in str(err.value) and f"line {line}" in str(err.value)


def test_invalid_utf8_and_empty_corpus(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a", "title": "A", "text": "ok"}\n{"id": "b", "title": "\xff", "text": "x"}\n')
    with pytest.raises(InputError, match="invalid UTF-8") as err:
        validate_corpus(bad)
    assert err.value.line == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match="empty"):
        Corpus.load(empty)


def test_passages_cover_every_word_and_map_back():
    docs = Corpus([__import__("core.corpus", fromlist=["Document"]).Document("x", "T", " ".join(map(str, range(250))))]).documents
    passages = list(split_passages(docs, words_per_passage=100, stride=80))
    assert [p.pid for p in passages] == list(range(len(passages)))
    covered = set()
    for p in passages:
        assert p.doc_id == "x" and len(p.text.split()) <= 100
        covered.update(p.text.split())
    assert covered == {str(i) for i in range(250)}
    assert passages[-1].text.split()[-1] == "249"
    assert json.loads(json.dumps(docs[0].to_json()))["id"] == "x"


def test_beir_rows_may_have_empty_titles_and_every_index_but_the_trie_takes_them(tmp_path):
    """BEIR corpora leave titles empty; BM25 and passages take them, the title trie refuses them by id."""
    path = tmp_path / "beir.jsonl"
    write_jsonl(path, [{"_id": "d1", "title": "", "text": "the first body"},
                       {"_id": "d2", "title": "Two", "text": "the second body"},
                       {"_id": "d3", "title": " ", "text": "the third body"}])
    corpus = Corpus.load(path)
    assert [d.title for d in corpus] == ["", "Two", " "]
    assert [p.encode_text for p in corpus.passages()][0] == "the first body"
    from retrievers.generative.index import corpus_trie
    from retrievers.generative.model import SEQ2SEQ, TitleSpec

    class Tok:  # never reached: the empty titles are refused first
        def __call__(self, *a, **k):
            raise AssertionError("tokenised")
    with pytest.raises(InputError, match=r"2 document\(s\) have an empty title \(ids d1, d3\)"):
        corpus_trie(corpus, Tok(), TitleSpec(SEQ2SEQ, 1, 2))
