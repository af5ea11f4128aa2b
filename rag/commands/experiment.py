"""`rag experiment NAME ...`: the studies that produce tables and plots (peft-retrieval, generative, cit)."""
from __future__ import annotations

import argparse

from rag.commands.plugins import EXPERIMENTS, dispatch
from core.errors import RagError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help=f"run a study: {', '.join(EXPERIMENTS)}", add_help=False)
    p.add_argument("name")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.name not in EXPERIMENTS:
        raise RagError(f"unknown experiment {args.name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return dispatch(f"rag experiment {args.name}", EXPERIMENTS[args.name], f"experiment {args.name}", args.rest)
