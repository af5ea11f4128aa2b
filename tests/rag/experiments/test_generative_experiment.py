"""`rag experiment generative --small`: every row of the table, with a tiny bert2bert."""
from __future__ import annotations

import json

from tests.retrievers.test_generative_train import make_tiny_model


def test_small_preset_writes_the_table(small_corpus, small_queries, tmp_path, capsys):
    from rag.cli import main

    model = make_tiny_model("bert2bert", tmp_path / "tiny")
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps({"dense": {"Rprec": 0.5, "recall@5": 0.75, "queries_per_second": 100.0}}))
    out = tmp_path / "exp"
    argv = ["experiment", "generative", "--corpus", str(small_corpus), "--train", str(small_queries),
            "--dev", str(small_queries), "--out", str(out), "--small", "--model", str(model), "--methods", "iaa"]
    assert main(argv + ["--baselines", str(baselines)]) == 0
    md = (out / "generative.md").read_text()
    assert "| dense | untuned |" in md and "(c) pre-train only (zero-shot) | iaa" in md
    data = json.loads((out / "generative.json").read_text())
    settings = [r["setting"] for r in data["rows"]]
    assert settings == ["dense", "(a) fine-tune only", "(b) pre-train + fine-tune", "(c) pre-train only (zero-shot)",
                        "(a) fine-tune only, 50% Qs", "(b) pre-train + fine-tune, 50% Qs"]
    for r in data["rows"][1:]:
        assert {"Rprec", "recall@5", "queries_per_second"} <= set(r["dev"])
    assert data["low_resource_questions"] == 2 and data["train_questions"] == 3
    assert sum(data["pair_stats"]["pairs"].values()) > 0
    assert (out / "generative_dev.png").exists()
    runs = out / "runs"
    assert (runs / "pretrain+finetune-iaa" / "generative_run.json").exists()
    assert not (runs / "pretrain-iaa" / "checkpoints").exists()  # deleted unless --keep-checkpoints
    init = json.loads((runs / "pretrain+finetune-iaa" / "generative_run.json").read_text())["init"]
    assert init == str((runs / "pretrain-iaa").resolve())
    # finished runs are reused; BM25 is built when no baselines file is given
    capsys.readouterr()
    assert main(argv + ["--no-dense"]) == 0
    again = json.loads((out / "generative.json").read_text())
    assert again["rows"][0]["setting"] == "BM25" and again["rows"][0]["dev"]["Rprec"] == 1.0
    assert again["runs"]["finetune-iaa"] == data["runs"]["finetune-iaa"]
