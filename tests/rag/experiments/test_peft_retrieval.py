"""`rag experiment peft-retrieval --small`: every row, the table (markdown + JSON) and the plots, in seconds."""
from __future__ import annotations

import json
import time

from rag.cli import main
from rag.experiments.peft_retrieval import METHODS, smooth, steps_to
from tests.retrievers.dense_fixtures import build_tiny_st, write_toy_data


def test_small_preset_writes_table_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "home"))
    data = write_toy_data(tmp_path / "data")
    encoder = build_tiny_st(tmp_path / "tiny-st")
    out = tmp_path / "exp"
    start = time.perf_counter()
    assert main(["experiment", "peft-retrieval", "--small", "--corpus", str(data["corpus"]), "--train",
                 str(data["train"]), "--dev", str(data["dev"]), "--encoder", str(encoder), "--out", str(out)]) == 0
    assert time.perf_counter() - start < 60
    result = json.loads((out / "peft_retrieval.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == [m.name for m in METHODS]
    assert rows["untuned"]["trainable_params"] == 0
    assert rows["full"]["trainable_pct_of_encoder"] == 100.0
    for name in ("bitfit", "lora", "prefix", "adapter", "iaa"):
        assert 0 < rows[name]["trainable_pct_of_encoder"] < 100, name
    assert rows["adapter"]["trainable_params"] < rows["iaa"]["trainable_params"]  # iaa adds the chain C_l
    for name, row in rows.items():
        assert row["recall@20"] is not None, name
        if name != "untuned":
            assert row["loss@6"] is not None and row["seconds_per_step"] > 0 and row["peak_rss_mb"] > 0
    assert set(result["per_topic"]) == {"Animals", "Cities", "Sports"}
    md = (out / "peft_retrieval.md").read_text()
    assert "| iaa+moe |" in md and "after 2/4/6 steps" in md and "Per topic" in md
    for png in ("peft_retrieval_loss.png", "peft_retrieval_dev.png"):
        assert (out / png).stat().st_size > 0
    # a second call reuses the finished runs
    assert main(["experiment", "peft-retrieval", "--small", "--corpus", str(data["corpus"]), "--train",
                 str(data["train"]), "--dev", str(data["dev"]), "--encoder", str(encoder), "--out", str(out),
                 "--methods", "untuned,iaa"]) == 0
    assert [r["method"] for r in json.loads((out / "peft_retrieval.json").read_text())["rows"]] == ["untuned", "iaa"]


def test_smoothing_and_steps_to_threshold():
    curve = [(1, 3.0), (2, 1.0), (3, 1.0), (4, 0.0)]
    assert smooth(curve, 2) == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
    assert steps_to(smooth(curve, 2), 1.0) == 3 and steps_to(curve, -1.0) is None


def test_unknown_method_is_refused(tmp_path, capsys):
    assert main(["experiment", "peft-retrieval", "--small", "--corpus", "c", "--train", "t", "--dev", "d",
                 "--out", str(tmp_path), "--methods", "iaa,qlora"]) == 2
    assert "unknown method(s) ['qlora']" in capsys.readouterr().err
