"""Every command's `--help` works at every level, and every flag says what it does and its default."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from rag.cli import build_parser
from rag.commands.plugins import DATA_VERBS, EXPERIMENTS, plugin_parser
from rag.commands.train import TRAINERS, trainer_parser


def _walk(parser: argparse.ArgumentParser, path: str):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def _plugin_parsers():
    for what, kinds in TRAINERS.items():
        for kind in kinds:
            yield f"rag train {what} --kind {kind}", trainer_parser(what, kind)
    for table, prefix in ((EXPERIMENTS, "rag experiment"), (DATA_VERBS, "rag data")):
        for name, module in table.items():
            yield f"{prefix} {name}", plugin_parser(f"{prefix} {name}", module, name)


def _all_parsers():
    yield from _walk(build_parser(), "rag")
    yield from _plugin_parsers()


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    bad = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.dest == "rest":
            continue
        name = "/".join(action.option_strings) or action.dest
        text = action.help or ""
        if not text.strip():
            bad.append(f"{name}: no help")
        elif action.option_strings and not action.required and "default" not in text and "required" not in text:
            bad.append(f"{name}: help does not state the default")
    return bad


def test_every_flag_has_help_with_its_default():
    problems = {path: bad for path, parser in _all_parsers() if (bad := _undocumented(parser))}
    assert not problems, "\n".join(f"{path}: {bad}" for path, bad in problems.items())


def test_the_help_audit_catches_a_bare_flag():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bare")
    parser.add_argument("--fine", help="what it does (default: 3)")
    assert _undocumented(parser) == ["--bare: no help"]


@pytest.mark.parametrize("argv, names", [
    (["train", "retriever", "--help"], list(TRAINERS["retriever"])),
    (["train", "reader", "--help"], list(TRAINERS["reader"])),
    (["train", "retriever"], list(TRAINERS["retriever"])),
    (["experiment", "--help"], list(EXPERIMENTS)),
    (["experiment"], list(EXPERIMENTS)),
])
def test_help_lists_the_choices(argv, names, capsys):
    from rag.cli import main

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in names), out


@pytest.mark.parametrize("argv", [["--help"], ["index", "build", "--help"], ["train", "reader", "--kind", "fid", "--help"],
                                  ["data", "cloze", "--help"], ["eval", "kilt", "--help"]])
def test_help_exits_zero(argv):
    from rag.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0


def test_output_piped_into_head_ends_quietly(tmp_path):
    code = ("import sys\nsys.argv=['rag','train','retriever','--help']\nfrom rag.cli import main\n"
            "import builtins\n_p=builtins.print\n"
            "def spam(*a, **k):\n    [_p(*a, **k) for _ in range(20000)]\n"
            "builtins.print=spam\nsys.exit(main())")
    proc = subprocess.run(f"{sys.executable} -c \"$CODE\" | head -1", shell=True, capture_output=True, text=True,
                          env={"CODE": code, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.stdout.startswith("usage: rag train retriever")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
