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


def test_lookup_follows_paths_and_list_selectors():
    from rag.repro import _lookup
    metrics = {"crp": [{"model": "bm25", "corpus": "a", "crp": {"Rprec": 0.5}},
                       {"model": "dense", "corpus": "a", "crp": {"Rprec": 0.9}}],
               "readers": {"lambda=1": {"dev (vital10k)": {"em": 0.25}}}}
    assert _lookup(metrics, "crp.[model=dense,corpus=a].crp.Rprec") == 0.9
    assert _lookup(metrics, "readers.lambda=1.dev (vital10k).em") == 0.25
    with pytest.raises(KeyError, match="0 matching"):
        _lookup(metrics, "crp.[model=none].crp.Rprec")


def test_grouped_table_once_and_clear_steps(tmp_path, monkeypatch):
    """Table rows name their columns and group; `once:` skips a finished step; `clear` removes a folder."""
    import json

    import rag.cli
    calls = []

    def fake_main(argv):
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        (tmp_path / "w").mkdir(exist_ok=True)
        (tmp_path / "w" / "m.json").write_text(json.dumps({"a": {"x": 0.5, "y": 0.25}}))
        if argv[0] == "build":
            (tmp_path / out).mkdir(parents=True, exist_ok=True)
            (tmp_path / out / "manifest.json").write_text("{}")
        return 0

    monkeypatch.setattr(rag.cli, "main", fake_main)
    matrix = tmp_path / "m.yaml"
    (tmp_path / "w" / "old").mkdir(parents=True)
    matrix.write_text(f"""
settings: {{work: {tmp_path / 'w'}, groups: {{g: "Group title"}}}}
conditions:
  c1:
    description: d
    steps: ["clear {{work}}/old", "once:build --out {tmp_path / 'idx'}", "score --out x"]
    metrics_file: "{{work}}/m.json"
    expected: {{a.x: 0.5, a.y: 0.25}}
    table:
      - {{label: first, data: D, group: g, columns: {{"X col": a.x}}}}
      - {{label: second, data: D, group: g, columns: {{"Y col": a.y}}}}
""")
    rows = check(matrix=matrix)
    assert all(r["pass"] for r in rows) and not (tmp_path / "w" / "old").exists()
    assert [c[0] for c in calls] == ["build", "score"]
    check(matrix=matrix)
    assert [c[0] for c in calls] == ["build", "score", "score"], "a finished once: step is skipped"
    table = render_table(matrix)
    assert "**Group title**" in table and "| first | D | 0.5000 |  |" in table and "| second | D |  | 0.2500 |" in table
    matrix.write_text(matrix.read_text().replace('"Y col": a.y', '"Y col": a.z'))
    with pytest.raises(Exception, match="without an expected value"):
        render_table(matrix)


def test_condition_tolerance_is_a_floor(tmp_path, monkeypatch):
    import json

    import rag.cli

    def fake_main(argv):
        (tmp_path / "m.json").write_text(json.dumps({"a": 0.5}))
        return 0

    monkeypatch.setattr(rag.cli, "main", fake_main)
    matrix = tmp_path / "m.yaml"
    spec = ("conditions:\n  c:\n    description: d\n    steps: [\"score --out x\"]\n"
            f"    metrics_file: \"{tmp_path / 'm.json'}\"\n    expected: {{a: 0.45}}\n")
    matrix.write_text(spec)
    assert not check(matrix=matrix)[0]["pass"]
    matrix.write_text(spec + "    tolerance: 0.08\n")
    assert check(matrix=matrix)[0]["pass"]
    assert check(matrix=matrix, tolerance=0.001)[0]["tolerance"] == 0.08, "a stricter --tolerance does not undercut it"
