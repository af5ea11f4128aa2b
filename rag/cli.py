"""The one `rag` command. Each verb lives in rag/commands/<verb>.py and registers itself in COMMANDS."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from core.errors import RagError
from rag.flags import document_defaults

COMMANDS = ["rag.commands.data", "rag.commands.index", "rag.commands.retrieve", "rag.commands.answer",
            "rag.commands.eval", "rag.commands.rerank", "rag.commands.train", "rag.commands.experiment", "rag.commands.demo", "rag.repro"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="rag", description="Retrieval and RAG adaptation toolkit. "
                                     "`rag COMMAND --help` lists a command's flags.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and full tracebacks (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise  # a verb not built yet is simply absent; any other import error is a bug
    return document_defaults(parser)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "httpx", "urllib3", "sentence_transformers", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of our output went away (`rag ... | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print("rag: error: interrupted", file=sys.stderr)
        return 130
    except (RagError, OSError, UnicodeError, RecursionError) as exc:
        # A user's mistake (bad input, a path that is a folder, a file we may not read, text that is not
        # valid Unicode, JSON nested too deeply) is one line, not a traceback; -v shows the traceback.
        if args.verbose:
            raise
        print(f"rag: error: {error_line(exc)}", file=sys.stderr)
        return 2
    return int(result or 0)


def error_line(exc: BaseException) -> str:
    """One line for an exception the user can act on, naming the file where the exception has one."""
    if isinstance(exc, RagError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return ("input nested too deeply to read (maximum recursion depth exceeded): is a JSON value nested "
                "thousands of levels deep?")
    if isinstance(exc, OSError) and exc.strerror:
        # a rename names (source, destination): the destination is the user's path, the source a temp file
        name = exc.filename2 if exc.filename2 is not None else exc.filename
        text = f"{name}: {exc.strerror}" if name is not None else exc.strerror
        return {PermissionError: f"{text} (no permission to read or write it)",
                IsADirectoryError: f"{text} (a folder was given where a file is expected)",
                NotADirectoryError: f"{text} (a file was given, or is on the path, where a folder is expected)",
                FileExistsError: f"{text} (a file is in the way)"}.get(type(exc), text)
    if isinstance(exc, UnicodeError):
        return f"invalid Unicode: {' '.join(str(exc).split())}"
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
