"""The `rag` CLI end to end on a small corpus: build, retrieve, evaluate, and its error messages."""
from __future__ import annotations

import json

from rag.cli import main


def test_bm25_and_dense_chain(small_corpus, small_queries, tmp_path, capsys):
    for kind in ("bm25", "dense"):
        index = tmp_path / kind
        extra = ["--batch-size", "4"] if kind == "dense" else []
        assert main(["index", "build", "--corpus", str(small_corpus), "--out", str(index), "--kind", kind,
                     *extra]) == 0
        assert (index / "manifest.json").exists() and (index / "run.json").exists()
        guess, trec = tmp_path / f"{kind}.jsonl", tmp_path / f"{kind}.trec"
        assert main(["retrieve", "--index", str(index), "--queries", str(small_queries), "--k", "3",
                     "--out", str(guess), "--trec", str(trec)]) == 0
        rows = [json.loads(line) for line in guess.read_text().splitlines()]
        assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
        prov = rows[0]["output"][0]["provenance"]
        assert {"wikipedia_id", "title", "score", "text"} <= set(prov[0]) and len(prov) <= 3
        assert [p["score"] for p in prov] == sorted((p["score"] for p in prov), reverse=True)
        assert len(trec.read_text().splitlines()) == sum(len(r["output"][0]["provenance"]) for r in rows)
        run = json.loads((tmp_path / f"{kind}.jsonl.run.json").read_text())
        assert "versions" in run and "retrieve_s" in run["timings"]
        capsys.readouterr()
        assert main(["eval", "kilt", str(guess), str(small_queries), "--ks", "1,3", "--json"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert metrics["retrieval"]["Rprec"] >= 2 / 3  # the three questions are easy for both
        assert "downstream" not in metrics


def test_errors_are_one_clear_line(small_corpus, tmp_path, capsys):
    out = tmp_path / "bm25"
    assert main(["index", "build", "--corpus", str(small_corpus), "--out", str(out), "--kind", "bm25"]) == 0
    capsys.readouterr()
    assert main(["index", "build", "--corpus", str(small_corpus), "--out", str(out), "--kind", "bm25"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "A", "text": "x"}\n{"id": "b", "text": "y"}\n')
    assert main(["index", "build", "--corpus", str(bad), "--out", str(tmp_path / "x"), "--kind", "dense"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 2" in err and "'title'" in err
    assert not (tmp_path / "x").exists()
    assert main(["index", "build", "--corpus", str(small_corpus), "--out", str(tmp_path / "y"), "--kind", "nope"]) == 2
    assert "bm25" in capsys.readouterr().err


def test_a_flag_of_another_index_kind_is_refused(small_corpus, tmp_path, capsys):
    out = tmp_path / "bm25"
    assert main(["index", "build", "--corpus", str(small_corpus), "--out", str(out), "--kind", "bm25",
                 "--encoder", "minilm"]) == 2
    assert "--kind bm25 does not take --encoder" in capsys.readouterr().err
    assert not out.exists()


def test_index_config_file_and_flags_layer(small_corpus, tmp_path):
    import json

    config = tmp_path / "bm25.yaml"
    config.write_text("k1: 1.2\nwords_per_passage: 50\n", encoding="utf-8")
    out = tmp_path / "bm25"
    assert main(["index", "build", "--corpus", str(small_corpus), "--out", str(out), "--kind", "bm25",
                 "--config", str(config), "--stride", "25"]) == 0
    recorded = json.loads((out / "run.json").read_text())["config"]
    assert recorded["k1"] == 1.2 and recorded["words_per_passage"] == 50 and recorded["stride"] == 25
