"""Data preparers: real packaged data (kept fast) plus small synthetic inputs for the parsers."""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from core.errors import RagError
from core.io import read_jsonl
from rag.data import enwiki, fanoutqa, foldoc, vital10k
from rag.data.preparers import PREPARERS, locate_package_file, prepare

TOPICS = {
    "Arts", "Biology and health sciences", "Everyday life", "Geography", "History", "Mathematics",
    "People", "Philosophy and religion", "Physical sciences", "Society and social sciences",
    "Technology", "Uncategorized",
}


def check_anchor_offsets(doc: dict) -> None:
    paragraphs = doc["text"].split("\n\n")
    for a in doc.get("anchors", ()):
        assert set(a) == {"text", "title", "paragraph", "start", "end"}
        assert paragraphs[a["paragraph"]][a["start"]:a["end"]] == a["text"], (doc["title"], a)


# --------------------------------------------------------------------------- registry

def test_registry_names_and_errors(tmp_path):
    assert set(PREPARERS) == {"vital10k", "fanoutqa", "foldoc", "enwiki-mini"}
    assert all(callable(f) for f in PREPARERS.values())
    with pytest.raises(RagError, match="unknown dataset"):
        prepare("nope", tmp_path)
    with pytest.raises(RagError, match="bad options"):
        prepare("vital10k", tmp_path, no_such_option=1)
    with pytest.raises(RagError, match="make setup"):
        locate_package_file("no-such-distribution-rag-test", "x.json")
    with pytest.raises(RagError, match="make setup"):
        locate_package_file("fanoutqa", "fanoutqa/data/no-such-file.json")


# --------------------------------------------------------------------------- vital10k

@pytest.fixture(scope="module")
def vital_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vital10k")
    stats = PREPARERS["vital10k"](out)
    return out, stats


@pytest.mark.slow
def test_vital10k_real(vital_dir):
    out, stats = vital_dir
    docs = read_jsonl(out / "corpus.jsonl")
    assert stats == json.loads((out / "stats.json").read_text())
    assert stats["entries"] == 10033
    assert len(docs) == stats["docs"] == 10033 - stats["skipped_empty_extract"]
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids)
    assert all(d["id"] == "v" + hashlib.sha1(d["title"].encode()).hexdigest()[:10] for d in docs)
    assert [d["title"] for d in docs] == sorted(d["title"] for d in docs)
    assert {d["domain"] for d in docs} <= TOPICS and len({d["domain"] for d in docs}) == 12
    assert all(d["text"].strip() and "\n\n\n" not in d["text"] and "description" in d for d in docs)
    assert sum(stats["domains"].values()) == len(docs)


def test_vital10k_skips_empty(tmp_path):
    src = tmp_path / "summaries.json"
    src.write_text(json.dumps({
        "B": {"title": "B", "extract": "Line one. \nLine two.", "description": "d", "topic": "Arts"},
        "A": {"title": "A", "extract": "Alpha.", "description": "", "topic": "History"},
        "E": {"title": "E", "extract": "  ", "description": "", "topic": "Arts"},
    }))
    stats = vital10k.prepare_vital10k(tmp_path / "out", source=src)
    docs = read_jsonl(tmp_path / "out" / "corpus.jsonl")
    assert [d["title"] for d in docs] == ["A", "B"]
    assert docs[1]["text"] == "Line one.\n\nLine two."
    assert stats["skipped_empty_extract"] == 1 and stats["docs"] == 2


def test_corpus_loader_accepts_output(vital_dir):
    corpus = pytest.importorskip("core.corpus")
    out, stats = vital_dir
    assert corpus.validate_corpus(out) == stats["docs"]


# --------------------------------------------------------------------------- fanoutqa

@pytest.fixture(scope="module")
def fanout_dirs(vital_dir, tmp_path_factory):
    corpus_dir, _ = vital_dir
    a, b = tmp_path_factory.mktemp("fanout_a"), tmp_path_factory.mktemp("fanout_b")
    stats = PREPARERS["fanoutqa"](a, corpus_dir=corpus_dir)
    PREPARERS["fanoutqa"](b, corpus_dir=str(corpus_dir))
    return corpus_dir, a, b, stats


@pytest.mark.slow
def test_fanoutqa_real(fanout_dirs):
    corpus_dir, out, again, stats = fanout_dirs
    corpus = {d["id"]: d["title"] for d in read_jsonl(corpus_dir / "corpus.jsonl")}
    train, dev = read_jsonl(out / "train.jsonl"), read_jsonl(out / "dev.jsonl")
    # counts are reported and consistent
    assert stats["top_level_questions"] == 310
    assert stats["single_hop_with_evidence"] == 2142
    assert stats["matched"] == stats["matched_exact"] + stats["matched_normalized"] == len(train) + len(dev)
    assert stats["matched_with_duplicates"] >= 500
    assert (stats["train"], stats["dev"]) == (len(train), len(dev)) and train and dev
    assert 0.15 < len(dev) / (len(train) + len(dev)) < 0.45
    # split by top-level question: no top-level id (or sub-question id) on both sides
    def tops(rows):
        return {t for r in rows for t in [r["meta"]["top_level_id"], *r["meta"]["also_top_level_ids"]]}
    assert not tops(train) & tops(dev)
    ids = [r["id"] for r in train + dev]
    assert len(ids) == len(set(ids))
    for r in train + dev:
        assert isinstance(r["input"], str) and r["input"]
        (out0,) = r["output"]
        assert isinstance(out0["answer"], str) and out0["answer"]
        (prov,) = out0["provenance"]
        assert corpus[prov["wikipedia_id"]] == prov["title"]
        assert {"top_level_id", "pageid", "fanoutqa_answer"} <= set(r["meta"])
    # deterministic: a second run writes identical files
    for name in ("train.jsonl", "dev.jsonl"):
        assert (out / name).read_bytes() == (again / name).read_bytes()


def test_fanoutqa_needs_corpus(tmp_path):
    with pytest.raises(RagError, match="corpus_dir"):
        PREPARERS["fanoutqa"](tmp_path / "out")
    with pytest.raises(RagError, match="no corpus"):
        PREPARERS["fanoutqa"](tmp_path / "out", corpus_dir=tmp_path / "missing")


def test_answer_to_string():
    assert fanoutqa.answer_to_string("Left") == "Left"
    assert fanoutqa.answer_to_string(61.6) == "61.6"
    assert fanoutqa.answer_to_string(3) == "3"
    assert fanoutqa.answer_to_string(True) == "yes"
    assert fanoutqa.answer_to_string(["a", "b", 2]) == "a, b, 2"
    assert fanoutqa.answer_to_string({"Apple": 161000, "x": "y"}) == "Apple: 161000, x: y"


def _fanout_fixture(tmp_path: Path) -> tuple[Path, Path]:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [{"id": "d1", "title": "Foo Bar", "text": "t"}, {"id": "d2", "title": "Café", "text": "t"},
            {"id": "d3", "title": "Baz", "text": "t"}]
    (corpus / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sub = lambda sid, title, answer: {  # noqa: E731
        "id": sid, "question": f"q {sid}?", "answer": answer, "decomposition": [], "depends_on": [],
        "evidence": {"pageid": 1, "revid": 2, "title": title, "url": "u"}}
    questions = [
        {"id": "T1", "question": "?", "answer": "x", "decomposition": [
            sub("s1", "Foo Bar", "a"), sub("s2", "foo_bar", ["x", "y"]),
            {"id": "n", "question": "nested", "answer": None, "depends_on": [], "evidence": None,
             "decomposition": [sub("s3", "Cafe\u0301", 5)]}]},
        {"id": "T2", "question": "?", "answer": "x", "decomposition": [
            sub("s1", "Foo Bar", "a"), sub("s4", "Missing page", "m"), sub("s5", "Baz", "")]},
    ]
    src = tmp_path / "dev.json"
    src.write_text(json.dumps(questions))
    return corpus, src


def test_fanoutqa_matching_and_groups(tmp_path):
    corpus, src = _fanout_fixture(tmp_path)
    stats = fanoutqa.prepare_fanoutqa(tmp_path / "out", corpus_dir=corpus, source=src)
    assert stats["single_hop_with_evidence"] == 6
    assert stats["matched_exact"] == 1 and stats["matched_normalized"] == 2
    assert stats["unmatched"] == 1 and stats["empty_answer"] == 1 and stats["duplicate_subquestions"] == 1
    rows = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "dev.jsonl")
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {"s1", "s2", "s3"}
    assert by_id["s2"]["output"][0]["provenance"] == [{"wikipedia_id": "d1", "title": "Foo Bar"}]
    assert by_id["s2"]["output"][0]["answer"] == "x, y"
    assert by_id["s3"]["output"][0]["provenance"][0]["wikipedia_id"] == "d2"  # NFC match
    assert by_id["s1"]["meta"]["also_top_level_ids"] == ["T2"]
    # T1 and T2 share s1, so they are split together, whatever the fraction
    for fraction in (0.0, 0.5, 1.0):
        for seed in range(5):
            out = tmp_path / f"out-{fraction}-{seed}"
            s = fanoutqa.prepare_fanoutqa(out, corpus_dir=corpus, source=src, dev_fraction=fraction, seed=seed)
            assert {s["train"], s["dev"]} == {0, 3}
    assert fanoutqa.prepare_fanoutqa(tmp_path / "all-train", corpus_dir=corpus, source=src,
                                     dev_fraction=0.0)["dev"] == 0
    with pytest.raises(RagError, match="dev_fraction"):
        fanoutqa.prepare_fanoutqa(tmp_path / "x", corpus_dir=corpus, source=src, dev_fraction=1.5)


# --------------------------------------------------------------------------- enwiki-mini

@pytest.mark.slow
def test_enwiki_mini_real(tmp_path):
    stats = PREPARERS["enwiki-mini"](tmp_path)
    docs = read_jsonl(tmp_path / "corpus.jsonl")
    assert stats["docs"] == len(docs) >= 90
    assert stats["skipped_redirect"] > 50
    assert len({d["id"] for d in docs}) == len(docs)
    assert all(d["id"][0] == "e" and d["id"][1:].isdigit() and d["domain"] == "wikipedia" for d in docs)
    assert sum(bool(d.get("anchors")) for d in docs) > len(docs) // 2
    for d in docs:
        for token in ("{{", "}}", "[[", "]]", "<ref", "{|", "'''", "\n\n\n"):
            assert token not in d["text"], (d["title"], token)
        check_anchor_offsets(d)
    anarchism = next(d for d in docs if d["title"] == "Anarchism")
    assert anarchism["text"].startswith("Anarchism is a political philosophy")
    assert {"text": "political philosophy", "title": "Political philosophy"}.items() <= anarchism["anchors"][0].items()


def clean(wikitext: str):
    return enwiki.wikitext_to_text(wikitext)


def test_wikitext_links_and_anchors():
    text, anchors = clean("'''Foo''' is a [[political philosophy]] of [[state (polity)|states]] and [[bus]]es.")
    assert text == "Foo is a political philosophy of states and buses."
    assert [(a["text"], a["title"]) for a in anchors] == [
        ("political philosophy", "Political philosophy"), ("states", "State (polity)"), ("buses", "Bus")]
    for a in anchors:
        assert text[a["start"]:a["end"]] == a["text"] and a["paragraph"] == 0
    text, anchors = clean("See [[New_York_City#History|the city]] and [[#Notes|below]].")
    assert text == "See the city and below."
    assert [(a["text"], a["title"]) for a in anchors] == [("the city", "New York City")]


def test_wikitext_removes_markup():
    src = (
        "{{Infobox person|name=X|birth={{birth date|1900|1|1}}}}\n"
        "<!-- a comment -->X was born<ref name=\"a\">{{cite web|url=http://x}}</ref> in "
        "[[Paris]].<ref name=\"a\"/> At {{convert|5|km|mi}}.\n\n"
        "[[File:X.jpg|thumb|A [[caption]] here]]\n"
        "{| class=\"wikitable\"\n|-\n| cell {{x}} || [[Cell link]]\n|}\n"
        "== Life ==\nHe lived.<br/>Then [http://example.com a site] and [http://bare.example].\n"
        "* item [[one]]\n* item two\n"
        "== References ==\n{{reflist}}\n* [[Some ref]]\n"
        "[[Category:People]]\n[[de:X]]\n"
    )
    text, anchors = clean(src)
    assert text == "X was born in Paris. At 5 km.\n\nHe lived. Then a site and.\nitem one\nitem two"
    assert [(a["title"], a["paragraph"]) for a in anchors] == [("Paris", 0), ("One", 1)]
    paragraphs = text.split("\n\n")
    for a in anchors:
        assert paragraphs[a["paragraph"]][a["start"]:a["end"]] == a["text"]


def test_wikitext_edge_cases():
    # unclosed template runs to the blank line; namespace and interwiki links keep their text only
    text, anchors = clean("A {{broken template\n| x = 1\n\nB [[Wikipedia:About|about]] [[wikt:word|word]] "
                          "[[:Category:Things|things]] &amp; &nbsp;C")
    assert text == "A\n\nB about word things & C"
    assert anchors == []
    assert clean("[[Foo (band)|]] x")[0] == "Foo x"
    assert clean("")[0] == ""
    text, anchors = clean("Line one\n\n''[[ Spaced link ]]'' here")
    assert text == "Line one\n\nSpaced link here"
    assert anchors == [{"text": "Spaced link", "title": "Spaced link", "paragraph": 1, "start": 0, "end": 11}]


# --------------------------------------------------------------------------- foldoc

def test_dictd_base64_roundtrip():
    for n in (0, 1, 63, 64, 4095, 123456789):
        assert foldoc.dictd_b64decode(foldoc.dictd_b64encode(n)) == n
    assert foldoc.dictd_b64decode("B") == 1 and foldoc.dictd_b64decode("BA") == 64
    with pytest.raises(ValueError):
        foldoc.dictd_b64decode("a=")


def write_dictd(folder: Path, entries: list[tuple[list[str], str]], gz: bool = True) -> None:
    """entries: (headwords, raw entry text); writes foldoc.index and foldoc.dict(.dz)."""
    folder.mkdir(parents=True, exist_ok=True)
    data, index = b"", []
    for headwords, raw in entries:
        blob = raw.encode("utf-8")
        for h in headwords:
            index.append(f"{h}\t{foldoc.dictd_b64encode(len(data))}\t{foldoc.dictd_b64encode(len(blob))}")
        data += blob
    (folder / "foldoc.index").write_text("\n".join(sorted(index)) + "\n", encoding="utf-8")
    if gz:
        (folder / "foldoc.dict.dz").write_bytes(gzip.compress(data))
    else:
        (folder / "foldoc.dict").write_bytes(data)


SYNTHETIC = [
    (["00-database-short"], "00-database-short\n     A test dictionary\n\n"),
    (["bar", "bars"], "bar\nbars\n\n   <programming> A thing used by {foo (foo)} and {Baz}s.\n\n"
                      "   See {the\n   site (http://example.com/)}, {Nothing here} and {Long\n   \n(bar)}.\n\n"
                      "   (2001-01-01)\n\n"),
    (["foo", "foobar"], "Foo\nfoobar\n\n   1. <jargon, networking> Metasyntactic   variable;\n   see {bar}.\n\n"),
    (["baz"], "Baz\n\n   A baz.\n\n"),
    (["baz"], "Baz\n\n   A baz.\n\n   More about {foo}.\n\n"),  # same title again: merged
]


def test_foldoc_synthetic(tmp_path):
    write_dictd(tmp_path / "src", SYNTHETIC)
    stats = foldoc.prepare_foldoc(tmp_path / "out", source_dir=tmp_path / "src")
    docs = {d["title"]: d for d in read_jsonl(tmp_path / "out" / "corpus.jsonl")}
    assert set(docs) == {"bar", "Foo", "Baz"}
    assert stats["metadata_entries"] == 1 and stats["headwords"] == 5 and stats["entries"] == 4
    assert stats["docs"] == 3 and stats["merged_duplicate_titles"] == 1
    bar = docs["bar"]
    assert bar["id"] == "f" + hashlib.sha1(b"bar").hexdigest()[:10]
    assert bar["domain"] == "computing" and bar["aliases"] == ["bars"] and bar["tags"] == ["programming"]
    assert bar["text"] == ("<programming> A thing used by foo and Bazs.\n\n"
                           "See the site, Nothing here and Long.\n\n(2001-01-01)")
    assert [(a["text"], a["title"], a["paragraph"]) for a in bar["anchors"]] == [
        ("foo", "Foo", 0), ("Baz", "Baz", 0), ("Long", "bar", 1)]
    assert docs["Foo"]["text"] == "1. <jargon, networking> Metasyntactic variable; see bar."
    assert docs["Foo"]["aliases"] == ["foobar"] and docs["Foo"]["tags"] == ["jargon", "networking"]
    assert docs["Baz"]["text"] == "A baz.\n\nMore about foo."
    assert docs["Baz"]["anchors"][0]["paragraph"] == 1
    for d in docs.values():
        check_anchor_offsets(d)
    assert stats["links_external"] == 1 and stats["links_unresolved"] == 1
    # an unpacked package layout and an uncompressed .dict are found too
    write_dictd(tmp_path / "pkg" / "usr/share/dictd", SYNTHETIC, gz=False)
    assert foldoc.prepare_foldoc(tmp_path / "out2", source_dir=tmp_path / "pkg")["docs"] == 3
    with pytest.raises(RagError, match="foldoc.index"):
        foldoc.prepare_foldoc(tmp_path / "out3", source_dir=tmp_path / "empty")


def test_foldoc_without_apt(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RagError, match="foldoc is optional"):
        PREPARERS["foldoc"](tmp_path / "out")


@pytest.mark.slow
def test_foldoc_real(tmp_path):
    cached = foldoc.find_files(foldoc.cache_dir()) is not None
    if not cached and not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("no cached FOLDOC files and no apt-get/dpkg-deb to fetch them")
    try:
        stats = foldoc.prepare_foldoc(tmp_path)
    except RagError as exc:
        if cached:
            raise
        pytest.skip(f"cannot fetch dict-foldoc here: {exc}")
    docs = read_jsonl(tmp_path / "corpus.jsonl")
    assert stats["headwords"] > 14000 and stats["docs"] == len(docs) > 11000
    assert len({d["id"] for d in docs}) == len(docs)
    assert all(d["domain"] == "computing" for d in docs)
    assert not any(d["title"].startswith("00-database") for d in docs)
    assert Counter(bool(d.get("anchors")) for d in docs)[True] > len(docs) // 2
    titles = {d["title"] for d in docs}
    for d in docs[:2000]:
        check_anchor_offsets(d)
        assert all(a["title"] in titles for a in d.get("anchors", ()))


def test_fanoutqa_multihop_dev_set_has_every_evidence_page_in_the_corpus_as_gold(tmp_path):
    corpus, src = _fanout_fixture(tmp_path)
    fanoutqa.prepare_fanoutqa(tmp_path / "all-dev", corpus_dir=corpus, source=src, dev_fraction=1.0)
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "all-dev" / "dev_multihop.jsonl")}
    assert set(rows) == {"T1", "T2"}
    assert [p["wikipedia_id"] for p in rows["T1"]["output"][0]["provenance"]] == ["d1", "d2"]
    # T2's "Missing page" is not in the corpus: counted, not gold; Baz counts although its answer is empty
    assert [p["wikipedia_id"] for p in rows["T2"]["output"][0]["provenance"]] == ["d1", "d3"]
    assert rows["T2"]["meta"]["evidence_not_in_corpus"] == 1
    fanoutqa.prepare_fanoutqa(tmp_path / "no-dev", corpus_dir=corpus, source=src, dev_fraction=0.0)
    assert read_jsonl(tmp_path / "no-dev" / "dev_multihop.jsonl") == []
