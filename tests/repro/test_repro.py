"""The fast subset of the reproduction matrix reruns its exact commands and must match its scores."""
from __future__ import annotations

import pytest

from rag.repro import MATRIX, check, format_check, load_matrix, render_table


@pytest.mark.slow
def test_fast_subset_reproduces(tmp_path):
    rows = check(fast=True, work=tmp_path / "repro")
    assert rows, "the matrix has a fast subset"
    assert {r["condition"] for r in rows} == {"fast-bm25-slice", "fast-dense-slice"}
    assert all(r["pass"] for r in rows), format_check(rows)


def test_matrix_and_readme_table_agree():
    _, conditions = load_matrix(MATRIX)
    assert any(c.fast for c in conditions) and any(not c.fast for c in conditions)
    table = render_table(MATRIX)
    readme = (MATRIX.parent.parent / "README.md").read_text(encoding="utf-8")
    assert table in readme, "README results table is stale: run `rag repro table --write`"


def test_a_wrong_expectation_fails(tmp_path):
    matrix = tmp_path / "m.yaml"
    matrix.write_text(MATRIX.read_text().replace("retrieval.Rprec: 0.7250", "retrieval.Rprec: 0.1000"))
    rows = check(only=["fast-bm25-slice"], work=tmp_path / "w", matrix=matrix)
    assert any(not r["pass"] for r in rows if r["metric"] == "retrieval.Rprec")
