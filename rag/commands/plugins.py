"""Late-bound sub-command modules: an experiment or data verb is added by one line here.

Each module named below provides `add_arguments(parser)` and `run(args) -> int`; it is imported only
when its command runs (or `--help` is asked for it), so heavy imports stay off the CLI's start-up path.
"""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from core.errors import RagError

EXPERIMENTS: dict[str, str] = {
    "peft-retrieval": "rag.experiments.peft_retrieval",
    "generative": "rag.experiments.generative",
    "cit": "rag.experiments.cit",
    "rerank": "rag.experiments.rerank",
}

DATA_VERBS: dict[str, str] = {
    "pretrain-pairs": "rag.commands.pretrain_pairs",
    "cloze": "rag.commands.cloze",
    "derive": "rag.commands.derive",
}


def load_plugin(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise RagError(f"{what} is not available in this build (module {module} is missing)") from None
        raise


def plugin_parser(prog: str, module: str, what: str) -> argparse.ArgumentParser:
    """The plugin's own parser under `prog`, every default shown in its help."""
    from rag.flags import document_defaults

    plugin = load_plugin(module, what)
    parser = argparse.ArgumentParser(prog=prog, description=(plugin.__doc__ or "").strip().splitlines()[0]
                                     if plugin.__doc__ else None)
    plugin.add_arguments(parser)
    return document_defaults(parser)


def dispatch(prog: str, module: str, what: str, argv: Sequence[str], extra: dict | None = None) -> int:
    """Build the plugin's parser under `prog`, parse the remaining argv, and run it."""
    plugin = load_plugin(module, what)
    args = plugin_parser(prog, module, what).parse_args(list(argv))
    for key, value in (extra or {}).items():
        setattr(args, key, value)
    return int(plugin.run(args) or 0)
