"""The paired bootstrap: exact mean difference, an interval that covers it, and one that excludes 0 only for a
real difference."""
from __future__ import annotations

import numpy as np
import pytest

from core.errors import RagError
from eval.stats import mean_ci, paired_bootstrap


def test_interval_contains_the_mean_and_separates_real_from_null_differences():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 200).astype(float)
    better = np.where(rng.random(200) < 0.3, 1.0, a)  # flips some misses to hits
    same = a.copy()
    real = paired_bootstrap(a, better)
    null = paired_bootstrap(a, same)
    assert real["diff"] == pytest.approx(better.mean() - a.mean())
    assert real["ci_low"] <= real["diff"] <= real["ci_high"] and real["ci_low"] > 0
    assert null["diff"] == 0.0 and null["ci_low"] == 0.0 == null["ci_high"]
    assert paired_bootstrap(a, better, seed=3)["diff"] == real["diff"]


def test_mean_ci_and_bad_input():
    out = mean_ci([0.0, 1.0, 1.0, 1.0])
    assert out["mean"] == 0.75 and 0 <= out["ci_low"] <= 0.75 <= out["ci_high"] <= 1
    with pytest.raises(RagError):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_rag_eval_compare_pairs_two_guess_files(tmp_path, capsys):
    import json

    from rag.cli import main
    from tests.conftest import write_jsonl

    gold = write_jsonl(tmp_path / "gold.jsonl", [
        {"id": str(i), "input": f"q{i}", "output": [{"provenance": [{"wikipedia_id": f"d{i}"}]}]} for i in range(4)])
    hits = lambda ids: [{"id": str(i), "output": [{"provenance": [{"wikipedia_id": d}]}]} for i, d in ids]  # noqa: E731
    base = write_jsonl(tmp_path / "a.jsonl", hits([(0, "d0"), (1, "x"), (2, "x"), (3, "x")]))
    other = write_jsonl(tmp_path / "b.jsonl", hits([(0, "d0"), (1, "d1"), (2, "d2"), (3, "x")]))
    exclude = write_jsonl(tmp_path / "ex.jsonl", [{"id": "0", "input": "q0"}])
    assert main(["eval", "compare", str(gold), str(base), str(other), "--metrics", "Rprec", "--exclude",
                 str(exclude), "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == 3
    rprec = result["metrics"]["Rprec"]
    assert rprec["base"] == 0.0 and rprec["other"] == pytest.approx(2 / 3) and rprec["diff"] == pytest.approx(2 / 3)
    assert rprec["ci95"][0] <= rprec["diff"] <= rprec["ci95"][1]
