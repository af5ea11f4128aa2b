"""`rag train retriever --kind dense|generative ...` and `rag train reader --kind fid|causal ...`."""
from __future__ import annotations

import argparse

from rag.commands.plugins import TRAINERS, dispatch
from core.errors import RagError


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train retrievers and readers").add_subparsers(dest="train_what", required=True)
    for what, kinds in (("retriever", "dense | generative"), ("reader", "fid | causal")):
        # prefix_chars="+": every token after the verb goes to the plugin (argparse's REMAINDER refuses
        # options it does not know when they come first); --kind is taken out of them in run().
        p = train.add_parser(what, help=f"--kind {kinds}; `rag train {what} --kind K --help` lists its flags",
                             add_help=False, prefix_chars="+")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=run, train_what=what)


def _take_kind(rest: list[str]) -> tuple[str | None, list[str]]:
    for i, token in enumerate(rest):
        if token == "--kind" and i + 1 < len(rest):
            return rest[i + 1], rest[:i] + rest[i + 2:]
        if token.startswith("--kind="):
            return token.split("=", 1)[1], rest[:i] + rest[i + 1:]
    return None, rest


def run(args: argparse.Namespace) -> int:
    args.kind, args.rest = _take_kind(list(args.rest))
    if args.kind is None:
        raise RagError(f"rag train {args.train_what}: --kind is required")
    key = f"{args.train_what}:{args.kind}"
    if key not in TRAINERS:
        kinds = sorted(k.split(":")[1] for k in TRAINERS if k.startswith(args.train_what + ":"))
        raise RagError(f"unknown {args.train_what} kind {args.kind!r}; choose one of {', '.join(kinds)}")
    return dispatch(f"rag train {args.train_what} --kind {args.kind}", TRAINERS[key],
                    f"training a {args.kind} {args.train_what}", args.rest, {"kind": args.kind})
