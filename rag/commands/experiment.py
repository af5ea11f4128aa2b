"""`rag experiment NAME ...`: the studies that produce tables and plots (peft-retrieval, generative, cit)."""
from __future__ import annotations

import argparse

from core.errors import RagError
from rag.commands.plugins import EXPERIMENTS, dispatch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help=f"run a study: {', '.join(EXPERIMENTS)}", add_help=False,
                       prefix_chars="+")
    p.add_argument("name", nargs="?", help="the experiment; `rag experiment --help` lists them")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def _list() -> str:
    from rag.commands.plugins import load_plugin

    lines = ["usage: rag experiment NAME [flags]", "",
             "Run a study. `rag experiment NAME --help` lists its flags.", "", "experiments:"]
    for name, module in EXPERIMENTS.items():
        doc = (load_plugin(module, f"experiment {name}").__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<16} {doc[0] if doc else ''}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.name in (None, "-h", "--help"):
        print(_list())
        return 0
    if args.name not in EXPERIMENTS:
        raise RagError(f"unknown experiment {args.name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return dispatch(f"rag experiment {args.name}", EXPERIMENTS[args.name], f"experiment {args.name}", args.rest)
