"""Reproduction matrix (as Pyserini's): each condition is the exact `rag` commands and expected scores.

`rag repro check [--only NAME] [--tolerance 0.005] [--fast]` reruns the conditions and prints a
pass/fail table; `rag repro table` renders the README results table from the same YAML, so the
numbers in the README are the ones the matrix checks, never typed by hand.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.errors import RagError
from core.io import atomic_file, read_jsonl, write_jsonl

MATRIX = Path(__file__).resolve().parent.parent / "repro" / "matrix.yaml"
README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_BEGIN, TABLE_END = "<!-- repro-table:begin -->", "<!-- repro-table:end -->"


@dataclass
class Condition:
    name: str
    description: str
    steps: list[str]                       # `rag` command lines (without the leading `rag`), with {work} etc.
    expected: dict[str, float]             # metric path (e.g. retrieval.Rprec) -> value
    metrics_file: str                      # JSON written by the last step (`rag eval kilt --json > FILE`)
    fast: bool = False
    table: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)  # README row(s): label, data, group, columns
    cost: str = ""                         # how long the condition took when its expected scores were measured
    tolerance: float = 0.0                 # the condition's own floor under --tolerance (runs that vary run to run)

    def table_rows(self) -> list[dict[str, Any]]:
        rows = self.table if isinstance(self.table, list) else [self.table] if self.table else []
        return [{"group": "retrieval", **r} for r in rows]


def load_matrix(path: str | Path = MATRIX) -> tuple[dict[str, Any], list[Condition]]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    conditions = [Condition(name=name, **spec) for name, spec in data["conditions"].items()]
    return data.get("settings", {}), conditions


def slice_task(corpus: str, queries: str, out: str, n_queries: int, n_docs: int, seed: int = 0) -> None:
    """A fixed small slice: the first N questions plus their gold documents and a seeded sample of others."""
    import numpy as np

    qs = read_jsonl(queries)[:n_queries]
    gold = {str(p["wikipedia_id"]) for q in qs for o in q.get("output", []) for p in o.get("provenance", [])}
    docs = read_jsonl(Path(corpus) / "corpus.jsonl" if Path(corpus).is_dir() else corpus)
    others = [d for d in docs if d["id"] not in gold]
    pick = set(np.random.default_rng(seed).choice(len(others), size=min(n_docs, len(others)), replace=False).tolist())
    kept = [d for d in docs if d["id"] in gold] + [d for i, d in enumerate(others) if i in pick]
    Path(out).mkdir(parents=True, exist_ok=True)
    write_jsonl(Path(out) / "corpus.jsonl", sorted(kept, key=lambda d: d["id"]))
    write_jsonl(Path(out) / "queries.jsonl", qs)


def _lookup(metrics: Any, path: str) -> float:
    """Follow a dotted path; a part `[key=value,...]` picks the list element whose fields match."""
    value: Any = metrics
    for part in path.split("."):
        if part.startswith("[") and part.endswith("]"):
            want = dict(kv.split("=", 1) for kv in part[1:-1].split(","))
            matches = [v for v in value if all(str(v.get(k)) == w for k, w in want.items())]
            if len(matches) != 1:
                raise KeyError(f"{part}: {len(matches)} matching entries")
            value = matches[0]
        else:
            value = value[part]
    return float(value)


def _done(argv: list[str]) -> bool:
    """`once:` steps are skipped when their --out folder already holds a finished artefact."""
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    return out is not None and any((Path(out) / name).exists() for name in ("manifest.json", "metrics.json", "summary.json",
                                                                            "results.json"))


def run_condition(cond: Condition, work: Path, settings: dict[str, Any]) -> dict[str, float]:
    """Run a condition's steps in order (each a `rag` command or the built-in `slice`)."""
    from rag.cli import main

    subst = {"work": str(work), **{k: str(v) for k, v in settings.get("paths", {}).items()}}
    subst = {k: v.format(**subst) for k, v in subst.items()}
    for step in cond.steps:
        once = step.startswith("once:")
        argv = shlex.split(step.removeprefix("once:").format(**subst))
        if once and _done(argv):
            continue
        if argv[0] == "clear":  # built-in: remove a previous run's folder so the next step recomputes it
            import shutil
            shutil.rmtree(argv[1], ignore_errors=True)
            continue
        if argv[0] == "slice":
            opts = dict(a.lstrip("-").split("=", 1) for a in argv[1:])
            slice_task(opts["corpus"], opts["queries"], opts["out"], int(opts["n-queries"]), int(opts["n-docs"]))
            continue
        capture = None
        if ">" in argv:
            idx = argv.index(">")
            argv, capture = argv[:idx], argv[idx + 1]
        if capture:
            import contextlib
            import io
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = main(argv)
            with atomic_file(capture) as fh:
                fh.write(buf.getvalue())
        else:
            code = main(argv)
        if code != 0:
            raise RagError(f"{cond.name}: step failed ({code}): rag {' '.join(argv)}")
    metrics = json.loads(Path(cond.metrics_file.format(**subst)).read_text())
    return {key: _lookup(metrics, key) for key in cond.expected}


def check(only: list[str] | None = None, tolerance: float = 0.005, fast: bool = False, work: str | Path | None = None,
          matrix: str | Path = MATRIX) -> list[dict[str, Any]]:
    settings, conditions = load_matrix(matrix)
    work = Path(work or settings.get("work", "runs/repro"))
    rows = []
    for cond in conditions:
        if (only and cond.name not in only) or (fast and not cond.fast):
            continue
        start = time.perf_counter()
        try:
            got = run_condition(cond, work, settings)
            error = None
        except Exception as exc:  # noqa: BLE001 - a failing condition is a row, not a crash
            got, error = {}, f"{type(exc).__name__}: {exc}"
        allowed = max(tolerance, cond.tolerance)
        for key, expected in cond.expected.items():
            value = got.get(key)
            rows.append({"condition": cond.name, "metric": key, "expected": expected, "got": value,
                         "pass": value is not None and abs(value - expected) <= allowed,
                         "tolerance": allowed, "error": error,
                         "seconds": round(time.perf_counter() - start, 1)})
    return rows


def format_check(rows: list[dict[str, Any]]) -> str:
    lines = ["| condition | metric | expected | got | result |", "|---|---|---|---|---|"]
    for r in rows:
        got = "error" if r["got"] is None else f"{r['got']:.4f}"
        lines.append(f"| {r['condition']} | {r['metric']} | {r['expected']:.4f} | {got} | "
                     f"{'pass' if r['pass'] else 'FAIL'} |")
    failed = [r for r in rows if r["error"]]
    if failed:
        lines.append("")
        lines.extend(f"- {r['condition']}: {r['error']}" for r in {r["condition"]: r for r in failed}.values())
    return "\n".join(lines)


def render_table(matrix: str | Path = MATRIX) -> str:
    """The README results tables (one per group), from the expected scores of conditions with a `table` entry.

    A table row names its columns (`columns: {header: metric path}`) or shows every expected metric
    under the last part of its path.
    """
    settings, conditions = load_matrix(matrix)
    titles = settings.get("groups", {})
    groups: dict[str, list[tuple[str, str, dict[str, float]]]] = {}
    for c in conditions:
        for row in c.table_rows():
            columns = row.get("columns") or {m.split(".")[-1]: m for m in c.expected}
            missing = [m for m in columns.values() if m not in c.expected]
            if missing:
                raise RagError(f"{c.name}: table columns name metrics without an expected value: {missing}")
            groups.setdefault(row["group"], []).append(
                (row.get("label", c.name), row.get("data", ""), {h: c.expected[m] for h, m in columns.items()}))
    parts = []
    for group, rows in groups.items():
        headers = list(dict.fromkeys(h for _, _, cells in rows for h in cells))
        lines = [f"**{titles.get(group, group)}**", "", "| condition | data | " + " | ".join(headers) + " |",
                 "|---|---|" + "---|" * len(headers)]
        for label, data, cells in rows:
            lines.append(f"| {label} | {data} | " + " | ".join(f"{cells[h]:.4f}" if h in cells else "" for h in headers)
                         + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def update_readme(readme: str | Path = README, matrix: str | Path = MATRIX) -> None:
    text = Path(readme).read_text(encoding="utf-8")
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise RagError(f"{readme} has no {TABLE_BEGIN} ... {TABLE_END} markers")
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    with atomic_file(readme) as fh:
        fh.write(f"{head}{TABLE_BEGIN}\n{render_table(matrix)}\n{TABLE_END}{tail}")


def register(sub: argparse._SubParsersAction) -> None:
    repro = sub.add_parser("repro", help="reproduction matrix").add_subparsers(dest="repro_cmd", required=True)
    chk = repro.add_parser("check", help="rerun conditions and compare with the expected scores")
    chk.add_argument("--only", help="comma-separated condition names")
    chk.add_argument("--tolerance", type=float, default=0.005, help="allowed absolute deviation from an expected score")
    chk.add_argument("--fast", action="store_true", help="only the fast subset (what the test suite runs)")
    chk.add_argument("--work", help="working folder (default from the matrix settings)")
    chk.add_argument("--matrix", default=str(MATRIX), help="reproduction matrix YAML")
    chk.add_argument("--json", help="also write the rows (expected, got, seconds) to this JSON file")
    chk.set_defaults(func=_run_check)
    tab = repro.add_parser("table", help="print the README results table (--write updates README.md)")
    tab.add_argument("--write", action="store_true", help="rewrite the README's results tables in place")
    tab.add_argument("--matrix", default=str(MATRIX), help="reproduction matrix YAML")
    tab.set_defaults(func=_run_table)


def _run_check(args: argparse.Namespace) -> int:
    rows = check(args.only.split(",") if args.only else None, args.tolerance, args.fast, args.work, args.matrix)
    print(format_check(rows))
    if args.json:
        from core.io import write_json
        write_json(args.json, rows)
    return 0 if rows and all(r["pass"] for r in rows) else 1


def _run_table(args: argparse.Namespace) -> int:
    if args.write:
        update_readme(matrix=args.matrix)
    print(render_table(args.matrix))
    return 0
