#!/usr/bin/env python3
"""Type-check with the committed mypy configuration and hold the error count per file to a baseline.

`python .ci/mypy_baseline.py` fails when any file has more mypy errors than `mypy-baseline.txt` allows
(new code is typed); `--update` rewrites the baseline, and only lets it shrink unless `--allow-growth`.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "mypy-baseline.txt"
LINE = re.compile(r"^(?P<file>[^:\s]+\.py):\d+: error:")


def run_mypy() -> Counter[str]:
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--hide-error-context"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        sys.exit(f"mypy failed to run:\n{proc.stderr or proc.stdout}")
    return Counter(m["file"] for line in proc.stdout.splitlines() if (m := LINE.match(line)))


def read_baseline() -> Counter[str]:
    counts: Counter[str] = Counter()
    if BASELINE.exists():
        for line in BASELINE.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, count = line.rpartition(" ")
                counts[name] = int(count)
    return counts


def write_baseline(counts: Counter[str]) -> None:
    lines = ["# mypy errors per file (python .ci/mypy_baseline.py --update); it may only shrink"]
    lines += [f"{name} {count}" for name, count in sorted(counts.items()) if count]
    BASELINE.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite the baseline with the current counts")
    parser.add_argument("--allow-growth", action="store_true", help="with --update: accept more errors")
    args = parser.parse_args()
    now, base = run_mypy(), read_baseline()
    grown = {f: (base.get(f, 0), n) for f, n in now.items() if n > base.get(f, 0)}
    if args.update:
        if grown and not args.allow_growth:
            print("refusing to grow the baseline:", grown, file=sys.stderr)
            return 1
        write_baseline(now)
        print(f"baseline: {sum(now.values())} errors in {len(now)} files")
        return 0
    for name, (was, got) in sorted(grown.items()):
        print(f"{name}: {got} mypy errors, baseline allows {was}", file=sys.stderr)
    shrunk = sum(base.values()) - sum(now.values())
    print(f"mypy: {sum(now.values())} errors (baseline {sum(base.values())}"
          + (f"; {shrunk} fixed: run --update to lock that in" if shrunk > 0 and not grown else "") + ")")
    return 1 if grown else 0


if __name__ == "__main__":
    sys.exit(main())
