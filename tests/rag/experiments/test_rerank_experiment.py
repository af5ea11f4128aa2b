"""The re-ranking study end to end on a toy corpus with a tiny cross-encoder: arms, seeds, n, intervals."""
from __future__ import annotations

import json
import shutil

from rag.cli import main
from tests.retrievers.dense_fixtures import write_toy_data
from tests.retrievers.test_rerank import _tiny_cross_encoder_base


def test_rerank_study_writes_arms_with_seeds_n_and_intervals(tmp_path):
    data = write_toy_data(tmp_path)
    qa = tmp_path / "qa"
    qa.mkdir()
    shutil.copy(data["train"], qa / "train.jsonl")
    shutil.copy(data["dev"], qa / "dev.jsonl")
    shutil.copy(data["dev"], qa / "dev_multihop.jsonl")
    base = _tiny_cross_encoder_base(tmp_path / "tiny")
    assert main(["index", "build", "--kind", "bm25", "--corpus", str(data["corpus"]), "--out", str(tmp_path / "bm25"),
                 "--words-per-passage", "30", "--stride", "30"]) == 0
    out = tmp_path / "study"
    argv = ["experiment", "rerank", "--corpus", str(data["corpus"]), "--qa", str(qa), "--bm25-index",
            str(tmp_path / "bm25"), "--out", str(out), "--seeds", "0,1", "--steps", "4", "--batch-size", "4",
            "--max-length", "64", "--depth", "5", "--base", str(base)]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    names = [a["name"] for a in result["arms"]]
    assert names == ["bm25/dev", "reranker-full/dev", "bm25/shifted", "reranker-full/shifted"]
    arm = result["arms"][1]
    assert arm["seeds"] == [0, 1] and arm["n"] == 6
    lo, hi = arm["metrics"]["Rprec"]["ci95"]
    assert lo <= arm["metrics"]["Rprec"]["diff_vs_bm25"] <= hi
    assert set(arm["metrics"]["Rprec"]["per_seed"]) == {"0", "1"}
    mtime = (out / "reranker-seed0" / "metrics.json").stat().st_mtime
    assert main(argv) == 0  # finished seeds are reused
    assert (out / "reranker-seed0" / "metrics.json").stat().st_mtime == mtime
