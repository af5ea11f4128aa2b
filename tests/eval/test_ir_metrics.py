"""IR metrics over TREC runs and qrels, checked against values computed by hand from the definitions."""
from __future__ import annotations

import math

import pytest

from core.errors import InputError, RagError
from core.topics import load_topics
from eval.ir_metrics import evaluate_run, evaluate_run_files, read_qrels, read_run

QRELS = "q1 0 a 1\nq1 0 b 2\nq1 0 z 0\nq2 0 c 1\nq3 0 d 1\n"
RUN = ("q1 Q0 b 1 3.0 t\nq1 Q0 x 2 2.0 t\nq1 Q0 a 3 1.0 t\n"
       "q2 Q0 y 1 5.0 t\nq2 Q0 c 2 4.0 t\n")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_metrics_match_hand_computed_values(tmp_path):
    result = evaluate_run_files(_write(tmp_path, "run", RUN), _write(tmp_path, "qrels", QRELS),
                                ["ndcg@10", "mrr@10", "map", "recall@100", "precision@2"])
    # q1: gains 2 (b) at rank 1, 1 (a) at rank 3; ideal 2, 1.  q2: c (gain 1) at rank 2.  q3: not in the run: 0.
    ndcg_q1 = (2 / math.log2(2) + 1 / math.log2(4)) / (2 / math.log2(2) + 1 / math.log2(3))
    ndcg_q2 = (1 / math.log2(3)) / 1.0
    assert result["n"] == 3 and result["queries_in_run"] == 2
    assert result["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2 + 0) / 3, abs=1e-9)
    assert result["mrr@10"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert result["map"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2) / 1 + 0) / 3)
    assert result["recall@100"] == pytest.approx((1 + 1 + 0) / 3)
    assert result["precision@2"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert result["per_query"]["q3"]["map"] == 0.0


def test_beir_qrels_with_header(tmp_path):
    qrels = read_qrels(_write(tmp_path, "q.tsv", "query-id\tcorpus-id\tscore\nq1\ta\t1\nq1\tb\t2\n"))
    assert qrels == {"q1": {"a": 1, "b": 2}}


@pytest.mark.parametrize("text, message", [
    ("q1 0 a high\n", "relevance grade must be an integer"),
    ("q1 0 a 1 extra\n", "expected 4 columns"),
    ("q1 0 a 1\nq1 0 a 2\n", "judged twice"),
    ("", "no judgements"),
])
def test_bad_qrels_name_file_and_line(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        read_qrels(_write(tmp_path, "qrels", text))


@pytest.mark.parametrize("text, message", [
    ("q1 Q0 a 1 1.0\n", "expected 6 columns"),
    ("q1 Q0 a 1 1.0 t\nq1 Q0 a 2 0.5 t\n", "appears twice"),
    ("q1 Q0 a one 1.0 t\n", "rank must be an integer"),
    ("q1 Q0 a 1 nan t\n", "not finite"),
    ("q1 Q0 a 1 1.0 t\nq1 Q0 b 2 1.0 t\n", "rank column and the scores disagree"),
])
def test_bad_runs_are_refused(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        read_run(_write(tmp_path, "run", text))


def test_ties_follow_trec_eval_or_the_rank_column(tmp_path):
    # a and b tie; trec_eval puts b before a (document ids descending). The file ranks a first.
    path = _write(tmp_path, "run", "q1 Q0 a 1 1.0 t\nq1 Q0 b 2 1.0 t\n")
    qrels = {"q1": {"a": 1}}
    assert evaluate_run(read_run(path, ties="score"), qrels, ["mrr@10"])["mrr@10"] == pytest.approx(0.5)
    assert evaluate_run(read_run(path, ties="rank"), qrels, ["mrr@10"])["mrr@10"] == pytest.approx(1.0)
    consistent = _write(tmp_path, "run2", "q1 Q0 b 1 1.0 t\nq1 Q0 a 2 1.0 t\n")
    assert list(read_run(consistent)["q1"]) == ["b", "a"]


def test_judged_queries_must_be_topics(tmp_path):
    with pytest.raises(InputError, match="not in the topics"):
        evaluate_run(read_run(_write(tmp_path, "run", RUN)), read_qrels(_write(tmp_path, "qrels", QRELS)),
                     topics=["q1", "q2"])


def test_unknown_metric(tmp_path):
    with pytest.raises(RagError, match="unknown metric"):
        evaluate_run({"q": {"a": 1.0}}, {"q": {"a": 1}}, ["nope@3"])


def test_topics_in_trec_and_beir_formats(tmp_path):
    trec = load_topics(_write(tmp_path, "topics.tsv", "301\tinternational organized crime\n302\tpolio\n"))
    beir = load_topics(_write(tmp_path, "queries.jsonl", '{"_id": "q1", "text": "what is bm25"}\n'))
    assert trec == [("301", "international organized crime"), ("302", "polio")]
    assert beir == [("q1", "what is bm25")]
    from core.tasks import load_queries
    assert [(q.id, q.text) for q in load_queries(tmp_path / "topics.tsv")][0] == ("301", "international organized crime")
    assert [q.id for q in load_queries(tmp_path / "queries.jsonl")] == ["q1"]
    with pytest.raises(InputError, match="duplicate query id"):
        load_topics(_write(tmp_path, "dup.tsv", "1\ta\n1\tb\n"))


def test_trec_writer_refuses_ids_the_format_cannot_hold(tmp_path):
    from eval.trec import write_trec
    from retrievers.base import Hit

    out = tmp_path / "run.trec"
    with pytest.raises(RagError, match="whitespace"):
        write_trec(out, ["q 1"], [[Hit("d1", "T", 1.0)]])
    with pytest.raises(RagError, match="whitespace"):
        write_trec(out, ["q1"], [[Hit("d\n1 Q0 forged 1 9.0 x", "T", 1.0)]])
    assert not out.exists()


def _reference(ranked: list[str], judged: dict[str, int], k_ndcg: int, k_rr: int, k_recall: int) -> dict[str, float]:
    """The textbook definitions, as trec_eval states them (linear gains, log2 discount, AP over relevant docs)."""
    relevant = {d for d, g in judged.items() if g > 0}
    dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k_ndcg]) if judged.get(d, 0) > 0)
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k_ndcg]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    rr = next((1 / (i + 1) for i, d in enumerate(ranked[:k_rr]) if d in relevant), 0.0)
    hits, precisions = 0, []
    for i, d in enumerate(ranked):
        if d in relevant:
            hits += 1
            precisions.append(hits / (i + 1))
    return {"ndcg": dcg / idcg if idcg else 0.0, "rr": rr, "ap": sum(precisions) / len(relevant) if relevant else 0.0,
            "recall": len(relevant & set(ranked[:k_recall])) / len(relevant) if relevant else 0.0}


def test_random_runs_agree_with_the_definitions():
    import numpy as np

    rng = np.random.default_rng(7)
    docs = [f"d{i}" for i in range(40)]
    qrels = {f"q{q}": {d: int(g) for d, g in zip(rng.choice(docs, 8, replace=False), rng.integers(0, 4, 8))}
             for q in range(25)}
    qrels = {q: j for q, j in qrels.items() if any(g > 0 for g in j.values())}
    run = {q: {d: float(s) for d, s in zip(rng.choice(docs, 20, replace=False), rng.permutation(20) + 1)}
           for q in list(qrels)[:-3]}  # three judged queries missing from the run
    result = evaluate_run(run, qrels, ["ndcg@10", "mrr@10", "map", "recall@5"])
    refs = [_reference(sorted(run.get(q, {}), key=lambda d: -run[q][d]), qrels[q], 10, 10, 5) for q in qrels]
    for ours, ref in (("ndcg@10", "ndcg"), ("mrr@10", "rr"), ("map", "ap"), ("recall@5", "recall")):
        assert result[ours] == pytest.approx(sum(r[ref] for r in refs) / len(refs), abs=1e-9), ours


def test_rag_eval_trec_json_has_the_standard_metrics(tmp_path, capsys):
    import json

    from rag.cli import main

    assert main(["eval", "trec", str(_write(tmp_path, "run", RUN)), str(_write(tmp_path, "qrels", QRELS)),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"ndcg@10", "mrr@10", "map", "recall@100", "n"} <= set(out) and out["n"] == 3
    assert out["mrr@10"] == pytest.approx(0.5)
    assert main(["eval", "trec", str(_write(tmp_path, "bad", "q1 Q0 a 1\n")), str(tmp_path / "qrels")]) == 2
    assert "expected 6 columns" in capsys.readouterr().err
