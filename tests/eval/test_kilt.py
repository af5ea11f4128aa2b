"""Hand-computed checks of the official KILT metric definitions in eval/kilt.py."""
from __future__ import annotations

import json

import pytest
from rouge import Rouge

from core.errors import InputError
from eval.kilt import evaluate_kilt, evaluate_kilt_files, format_kilt_table


def page(wid, title=None, text=None):
    p = {"wikipedia_id": wid}
    if title is not None:
        p["title"] = title
    if text is not None:
        p["text"] = text
    return p


def guess(gid, pages, answer=None):
    out = {"provenance": pages}
    if answer is not None:
        out["answer"] = answer
    return {"id": gid, "output": [out]}


def close(a, b, tol=1e-12):
    return abs(a - b) <= tol


# ---------------------------------------------------------------- retrieval

def test_multi_page_evidence_set_is_one_point_at_its_last_page():
    # Evidence sets {A,B} and {C}; an answer-only output adds no set.
    gold = [{"id": "q", "input": "", "output": [
        {"answer": "x", "provenance": [page("A"), page("B")]},
        {"answer": "y", "provenance": [page("C")]},
        {"answer": "z"},
    ]}]
    # Deduplicated guess ids: A X C B. Rank: A->set0 partial, X->False, C->True,
    # B completes set0: its partial point moves to the end -> [False, True, True].
    res = evaluate_kilt([guess("q", [page("A"), page("X"), page("C"), page("B"), page("A")])],
                        gold, ks=(1, 2, 5))["retrieval"]
    assert close(res["Rprec"], 0.5)  # set {A,B}: R=2, [A, X] -> 1/2; set {C}: [A] -> 0
    assert res["precision@1"] == 0.0
    assert close(res["precision@2"], 0.5)
    assert close(res["precision@5"], 0.4)  # 2 True points / k
    assert close(res["recall@2"], 0.5)
    assert close(res["recall@5"], 1.0)
    assert res["success_rate@2"] == 1.0 and res["success_rate@5"] == 1.0
    assert "recall@1" not in res and "success_rate@1" not in res  # official: k > 1 only


def test_page_shared_by_two_evidence_sets_scores_for_both():
    gold = [{"id": 1, "input": "", "output": [
        {"provenance": [page("A"), page("B")]},
        {"provenance": [page("A")]},
    ]}]
    # A: set0 partial + set1 True -> [set0, True]; B completes set0 -> [True, True].
    res = evaluate_kilt([guess(1, [page("A"), page("B")])], gold, ks=(1, 2))["retrieval"]
    assert res["Rprec"] == 1.0
    assert res["precision@1"] == 1.0 and res["precision@2"] == 1.0
    assert res["recall@2"] == 1.0


def test_duplicate_guess_provenance_is_dropped_for_ranking_but_not_for_context():
    gold = [{"id": "q", "input": "", "output": [
        {"answer": "Paris", "provenance": [page("A"), page("B")]}]}]
    g = guess("q", [page("A", text="nothing"), page("A", text="nothing"),
                    page("B", text="Paris it is")])
    res = evaluate_kilt([g], gold, ks=(2, 5))["retrieval"]
    assert res["Rprec"] == 1.0  # deduplicated [A, B][:2] both gold; without dedup 1/2
    assert close(res["precision@2"], 0.5)  # rank [True]: one point for the whole set
    assert res["recall@2"] == 1.0
    assert res["answer_in_context@2"] == 0.0  # raw positions: two copies of A first
    assert res["answer_in_context@5"] == 1.0


def test_gold_without_provenance_counts_as_zero_in_the_average():
    gold = [
        {"id": "a", "input": "", "output": [{"answer": "x", "provenance": [page("A")]}]},
        {"id": "b", "input": "", "output": [{"answer": "y"}]},
    ]
    res = evaluate_kilt([guess("a", [page("A")]), guess("b", [page("A")])], gold, ks=(1, 2))
    assert res["n"] == 2
    r = res["retrieval"]
    assert close(r["Rprec"], 0.5) and close(r["precision@1"], 0.5)
    assert close(r["recall@2"], 0.5) and close(r["success_rate@2"], 0.5)


def test_empty_provenance_list_is_an_evidence_set_that_cannot_be_hit():
    gold = [{"id": "q", "input": "", "output": [
        {"provenance": [page("A")]}, {"answer": "y", "provenance": []}]}]
    res = evaluate_kilt([guess("q", [page("A")])], gold, ks=(2,))["retrieval"]
    assert res["Rprec"] == 1.0
    assert close(res["recall@2"], 0.5)  # 1 of 2 distinct evidence sets
    assert close(res["precision@2"], 0.5)


def test_answer_and_entity_in_context_read_only_the_text_field():
    gold = [{"id": "q", "input": "Which city is in France?", "output": [
        {"answer": "Paris", "provenance": [page("1", title="France")]}]}]
    g = guess("q", [
        page("9", title="Paris", text="France is big"),     # title in text, no answer
        page("8", title="Paris"),                           # no text: never matches
        page("7", text="Paris, the capital."),              # answer only
        page("6", text="PARIS is in france!"),              # both, after normalisation
    ])
    r = evaluate_kilt([g], gold, ks=(1, 2, 3, 4))["retrieval"]
    assert r["entity_in_input"] == 1.0
    assert [r[f"answer_in_context@{k}"] for k in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert [r[f"entity_in_context@{k}"] for k in (1, 2, 3, 4)] == [1, 1, 1, 1]
    assert [r[f"answer_and_ent_in_context@{k}"] for k in (1, 2, 3, 4)] == [0, 0, 0, 1]


def test_int_and_string_ids_match_and_guess_order_is_realigned():
    gold = [
        {"id": 1, "input": "", "output": [{"provenance": [page(101)]}]},
        {"id": 2, "input": "", "output": [{"provenance": [page(202)]}]},
    ]
    guesses = [guess("2", [page("999")]), guess(" 1 ", [page(" 101")])]
    r = evaluate_kilt(guesses, gold, ks=(1,))["retrieval"]
    assert close(r["Rprec"], 0.5)  # example 1 hit (101 == " 101" stripped), example 2 miss
    assert close(r["precision@1"], 0.5)


def test_title_rank_key():
    gold = [{"id": "q", "input": "", "output": [{"provenance": [page("1", title="Paris")]}]}]
    g = [guess("q", [page("999", title="Paris ")])]
    assert evaluate_kilt(g, gold, ks=(1,))["retrieval"]["Rprec"] == 0.0
    assert evaluate_kilt(g, gold, ks=(1,), rank_keys=("title",))["retrieval"]["Rprec"] == 1.0
    assert evaluate_kilt(g, gold, ks=(1,), rank_keys="title")["retrieval"]["precision@1"] == 1.0
    both = evaluate_kilt(g, gold, ks=(1,), rank_keys=("wikipedia_id", "title"))["retrieval"]
    assert both["Rprec"] == 0.0  # id is "999+Paris" vs "1+Paris"


def test_no_answers_means_retrieval_only():
    gold = [{"id": "q", "input": "", "output": [{"answer": "x", "provenance": [page("A")]}]}]
    res = evaluate_kilt([guess("q", [page("A")])], gold, ks=(1,))
    assert set(res) == {"n", "retrieval"}


# ---------------------------------------------------------------- downstream and KILT

def test_downstream_em_f1_accuracy_with_multi_output_gold():
    gold = [
        {"id": "a", "input": "", "output": [{"answer": "Paris"}, {"answer": " City of Paris "}]},
        {"id": "b", "input": "", "output": [{"answer": "Paris"}, {"answer": "City of Paris"}]},
        {"id": "c", "input": "", "output": [{"answer": "Paris"}]},
        {"id": "d", "input": "", "output": [{"answer": "Paris"}]},
    ]
    guesses = [
        guess("a", [], answer="City of Paris"),  # strict match (gold answers are stripped)
        guess("b", [], answer="the city of paris!"),  # EM after normalisation only
        guess("c", [], answer="Paris France"),  # F1: p=1/2, r=1 -> 2/3
        guess("d", [], answer="   "),  # empty: scores 0 but still counted
    ]
    d = evaluate_kilt(guesses, gold, ks=(1,))["downstream"]
    assert close(d["accuracy"], 1 / 4)
    assert close(d["em"], 2 / 4)
    assert close(d["f1"], (1 + 1 + 2 / 3 + 0) / 4)


def test_rougel_matches_direct_rouge_call_max_over_golds():
    golds = ["The cat sat on the mat.", "A dog barked loudly"]
    answer = "the cat barked on a mat"
    expected = max(Rouge().get_scores(answer, g, avg=True)["rouge-l"]["f"] for g in golds)
    gold = [{"id": "q", "input": "", "output": [{"answer": a} for a in golds]}]
    d = evaluate_kilt([guess("q", [], answer=answer)], gold, ks=(1,))["downstream"]
    assert 0 < expected < 1
    assert abs(d["rougel"] - expected) <= 1e-9


def test_rougel_empty_hypothesis_scores_zero():
    gold = [{"id": "q", "input": "", "output": [{"answer": "Paris"}]}]
    d = evaluate_kilt([guess("q", [], answer="...")], gold, ks=(1,))["downstream"]
    assert d["rougel"] == 0.0  # rouge raises "Hypothesis is empty."; official scores 0


def test_kilt_scores_only_where_page_rprecision_is_one():
    gold = [
        {"id": i, "input": "", "output": [{"answer": "Paris", "provenance": [page("P", title="Paris")]}]}
        for i in range(3)
    ]
    guesses = [
        guess(0, [page("P", title="Paris")], answer="Paris"),  # right page first: counts
        guess(1, [page("Q", title="Paris")], answer="Paris"),  # wrong page
        guess(2, [page("Q"), page("P")], answer="Paris"),  # right page at rank 2, R=1
    ]
    res = evaluate_kilt(guesses, gold, ks=(1,))
    assert res["downstream"]["em"] == 1.0 and res["downstream"]["accuracy"] == 1.0
    assert close(res["kilt"]["KILT-em"], 1 / 3)
    assert close(res["kilt"]["KILT-accuracy"], 1 / 3)
    assert close(res["kilt"]["KILT-f1"], 1 / 3)
    # official: the KILT gate is page-level (wikipedia_id) whatever rank_keys is
    by_title = evaluate_kilt(guesses, gold, ks=(1,), rank_keys=("title",))
    assert close(by_title["retrieval"]["Rprec"], 2 / 3)
    assert close(by_title["kilt"]["KILT-em"], 1 / 3)


# ---------------------------------------------------------------- input handling

def test_missing_guess_id_raises_input_error_naming_ids():
    gold = [{"id": i, "input": "", "output": [{"answer": "x"}]} for i in (1, 2, 3)]
    with pytest.raises(InputError, match=r"2 gold id\(s\): '2', '3'"):
        evaluate_kilt([guess("1", [])], gold)


def test_duplicate_guess_id_raises():
    gold = [{"id": 1, "input": "", "output": [{"answer": "x"}]}]
    with pytest.raises(InputError, match="duplicate id"):
        evaluate_kilt([guess(1, []), guess("1", [])], gold)


def test_bad_ks_raise():
    with pytest.raises(InputError):
        evaluate_kilt([], [], ks=(0, 5))


def test_jsonl_files_and_table(tmp_path):
    gold = [
        {"id": 1, "input": "q1", "output": [{"answer": "Paris", "provenance": [page(10, title="Paris")]}]},
        {"id": 2, "input": "q2", "output": [{"answer": "Rome", "provenance": [page(20, title="Rome")]}]},
    ]
    guesses = [guess("2", [page("21", text="Rome")], answer="Rome"),
               guess("1", [page("10", text="x")], answer="Paris")]
    gold_path, guess_path = tmp_path / "gold.jsonl", tmp_path / "guess.jsonl"
    gold_path.write_text("".join(json.dumps(r) + "\n" for r in gold), encoding="utf-8")
    guess_path.write_text("".join(json.dumps(r) + "\n" for r in guesses), encoding="utf-8")

    res = evaluate_kilt(str(guess_path), gold_path, ks=(1, 5))
    assert res == evaluate_kilt_files(guess_path, gold_path, ks=(1, 5))
    assert res == evaluate_kilt(guesses, gold, ks=(1, 5))
    assert res["n"] == 2
    assert close(res["retrieval"]["Rprec"], 0.5)
    assert close(res["retrieval"]["answer_in_context@1"], 0.5)
    assert res["downstream"]["em"] == 1.0 and close(res["kilt"]["KILT-em"], 0.5)

    table = format_kilt_table(res)
    assert "retrieval/Rprec" in table and "0.5000" in table and "kilt/KILT-em" in table

    guess_path.write_text(json.dumps(guesses[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        evaluate_kilt(guess_path, gold_path)


def test_compact_table_keeps_headline_metrics_only():
    result = {"n": 2, "retrieval": {"Rprec": 0.5, "precision@1": 0.5, "precision@5": 0.1, "recall@5": 1.0,
                                    "success_rate@5": 1.0, "entity_in_input": 0.0, "answer_in_context@5": 0.5}}
    compact = format_kilt_table(result, full=False)
    full = format_kilt_table(result)
    assert "retrieval/Rprec" in compact and "retrieval/recall@5" in compact and "retrieval/precision@1" in compact
    assert "entity_in_input" not in compact and "answer_in_context" not in compact and "precision@5" not in compact
    assert "entity_in_input" in full and "precision@5" in full
