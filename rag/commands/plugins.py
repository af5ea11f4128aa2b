"""Late-bound sub-command modules: a trainer, experiment or data verb is added by one line here.

Each module named below provides `add_arguments(parser)` and `run(args) -> int`; it is imported only
when its command runs (or `--help` is asked for it), so heavy imports stay off the CLI's start-up path.
"""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from core.errors import RagError

TRAINERS: dict[str, str] = {
    "retriever:dense": "retrievers.dense_train",
    "retriever:generative": "retrievers.generative.train",
    "reader:fid": "readers.train",
    "reader:causal": "readers.train",
}

EXPERIMENTS: dict[str, str] = {
    "peft-retrieval": "rag.experiments.peft_retrieval",
    "generative": "rag.experiments.generative",
    "cit": "rag.experiments.cit",
}

DATA_VERBS: dict[str, str] = {
    "pretrain-pairs": "retrievers.generative.pretrain_tasks",
    "cloze": "readers.cloze",
    "derive": "rag.transforms",
}


def load_plugin(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise RagError(f"{what} is not available in this build (module {module} is missing)") from None
        raise


def dispatch(prog: str, module: str, what: str, argv: Sequence[str], extra: dict | None = None) -> int:
    """Build the plugin's own parser under `prog`, parse the remaining argv, and run it."""
    plugin = load_plugin(module, what)
    parser = argparse.ArgumentParser(prog=prog, description=(plugin.__doc__ or "").strip().splitlines()[0]
                                     if plugin.__doc__ else None)
    plugin.add_arguments(parser)
    args = parser.parse_args(list(argv))
    for key, value in (extra or {}).items():
        setattr(args, key, value)
    return int(plugin.run(args) or 0)
