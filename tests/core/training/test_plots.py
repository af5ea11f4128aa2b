"""Curves: flat and repeated panels are named in a footnote instead of drawn."""
from __future__ import annotations

from core.training.plots import plot_curves, series, split_panels


def _rows(split, metric, values, start=0):
    return [{"step": start + i, "split": split, "metric": metric, "value": v} for i, v in enumerate(values)]


def test_constant_and_duplicate_metrics_are_not_drawn(tmp_path):
    rows = (_rows("dev", "Rprec", [0.5, 0.6, 0.7]) + _rows("dev", "recall@5", [0.5, 0.6, 0.7])
            + _rows("dev", "recall@20", [1.0, 1.0, 1.0]) + _rows("train", "loss", [2.0, 1.5], start=1))
    drawn, constant, duplicate = split_panels(series(rows, "dev"))
    assert drawn == ["Rprec"] and constant == {"recall@20": 1.0} and duplicate == {"recall@5": "Rprec"}
    assert series(rows, "dev")["Rprec"][0] == (0, 0.5)  # the step-0 point is part of the curve
    paths = plot_curves(rows, tmp_path)
    assert sorted(p.name for p in paths) == ["curves-dev.png", "curves-train.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_a_split_where_everything_is_flat_still_gets_one_panel(tmp_path):
    rows = _rows("dev", "em", [0.0, 0.0]) + _rows("dev", "f1", [0.0, 0.0])
    assert [p.name for p in plot_curves(rows, tmp_path)] == ["curves-dev.png"]
