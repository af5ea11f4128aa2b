"""`rag demo` on the embedded data (BM25 only, first dev questions, no swap: the fast path of the chain)."""
from __future__ import annotations

import json

import pytest

from rag.demo import REPORT_METRICS, DemoConfig, run_demo


@pytest.mark.slow
def test_demo_bm25_slice(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(DemoConfig(out=str(out), retrievers=("bm25",), limit=30, swap=None))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dev_questions"] == 30
    retrieval = metrics["results"]["bm25"]["retrieval"]
    assert set(REPORT_METRICS) <= set(retrieval)
    assert 0.2 < retrieval["Rprec"] <= 1.0  # BM25 finds many of these pages; a broken chain scores ~0
    assert retrieval["recall@100"] >= retrieval["recall@20"] >= retrieval["recall@5"]
    report = (out / "report.md").read_text()
    assert "| bm25 |" in report and "Rprec" in report
    assert (out / "runs" / "bm25.dev.trec").exists() and (out / "run.json").exists()
    # A second run reuses the data and the index.
    again = run_demo(DemoConfig(out=str(out), retrievers=("bm25",), limit=30, swap=None))
    assert again["bm25"]["index_build_s"] == 0.0
    assert again["bm25"]["retrieval"] == results["bm25"]["retrieval"]
