"""Confidence intervals for the differences studies report: a paired bootstrap over questions.

Two systems answered the same n questions; resampling the questions (with replacement, seeded) gives the
distribution of the mean difference. The 95% interval is the 2.5th and 97.5th percentiles. It measures
question-sampling noise only: seed-to-seed noise needs repeated runs (studies report both where they can).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.errors import RagError


def paired_bootstrap(a: Sequence[float], b: Sequence[float], samples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of b - a with a percentile bootstrap interval; `p_le_0` is the share of resamples with b - a <= 0."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise RagError(f"paired bootstrap needs two equal, non-empty lists of per-question scores ({x.shape} vs {y.shape})")
    diff = y - x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(samples, len(diff)))
    means = diff[idx].mean(axis=1)
    tail = (1 - level) / 2
    return {"n": int(len(diff)), "diff": float(diff.mean()), "ci_low": float(np.quantile(means, tail)),
            "ci_high": float(np.quantile(means, 1 - tail)), "p_le_0": float((means <= 0).mean())}


def mean_ci(values: Sequence[float], samples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of per-question scores with a bootstrap interval."""
    zeros = [0.0] * len(values)
    out = paired_bootstrap(zeros, values, samples, seed, level)
    return {"n": out["n"], "mean": out["diff"], "ci_low": out["ci_low"], "ci_high": out["ci_high"]}
