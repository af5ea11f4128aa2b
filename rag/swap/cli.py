"""Corpus-swap generalisation harness: `rag eval corpus-swap --config SWAP.yaml --out DIR [--address ADDR]`.

The command line: add_arguments and run (wired by rag/commands/eval.py)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rag.swap.cells import STATUS_FAILED
from rag.swap.report import PLOTS, TABLE
from rag.swap.runner import RESULTS, run_swap


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="swap config (YAML/JSON), e.g. configs/swap-demo.yaml")
    parser.add_argument("--out", required=True, type=Path, help="output folder (rerun with the same folder to resume)")
    parser.add_argument("--address", help="join this Ray cluster (e.g. auto or ray://host:10001) instead of a local Ray")
    parser.add_argument("--workers", type=int, help="local Ray CPUs (default: the config's); 0 = no Ray, one by one")


def run(args: argparse.Namespace) -> int:
    """Run the matrix, print the table; exit 1 if any cell failed (unavailable cells are not failures)."""
    rows = run_swap(args.config, args.out, address=args.address, workers=args.workers)
    print((Path(args.out) / TABLE).read_text(encoding="utf-8"))
    print(f"results: {Path(args.out) / RESULTS}; plots: {Path(args.out) / PLOTS}/")
    return 1 if any(r["status"] == STATUS_FAILED for r in rows) else 0


if __name__ == "__main__":  # pragma: no cover - `rag eval corpus-swap` is the entry point
    import sys
    parser = argparse.ArgumentParser(prog="rag eval corpus-swap", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run(parser.parse_args()))
