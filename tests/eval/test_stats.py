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
