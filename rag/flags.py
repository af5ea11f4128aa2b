"""The one way a typed config dataclass becomes command-line flags, and flags (plus `--config FILE`) a config.

Every field of the dataclass becomes `--field-name`; its help text is the field's `metadata["help"]` with
the default appended, and `metadata["choices"]` limits the values. A field's range (`min`, `max`, `gt`,
`lt`, `finite`: see core/config.py) is enforced by the flag's type, so a value out of range is
argparse's own one-line error (exit 2) before any work. Flags default to None ("not given"), so a config
file can sit under them: `build_config(cls, file, flags)` merges file values, then flags, and holds the
file's values to the same rules, plus the `check` and cross-field ones (a RagError).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core.config import build_config, check_value, field_rules, load_config_file
from core.errors import RagError


def _base_type(annotation: Any) -> Any:
    """int for `int | None`, str for `str`, ...; None for types a flag cannot hold (dicts, lists)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(inner[0]) if len(inner) == 1 else str
    if annotation in (int, float, str, bool):
        return annotation
    if origin is tuple and typing.get_args(annotation)[-1:] == (Ellipsis,):
        return _comma_list(typing.get_args(annotation)[0])
    return None


def _comma_list(item: Any) -> Any:
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}") from None
    parse.__name__ = f"list of {item.__name__}"
    return parse


def _checked(kind: Any, rules: Mapping[str, Any]) -> Any:
    """`kind` (int, float, str) as an argparse type that also enforces the field's rules."""
    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError here is argparse's "invalid int value: 'x'"
        try:
            check_value(value, rules)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value
    parse.__name__ = kind.__name__
    return parse


def _default_text(field: dataclasses.Field, default: Any) -> str:
    if default is dataclasses.MISSING:
        return "required"
    if default is None or default == "":
        return "default: none"
    if isinstance(default, tuple):
        return "default: " + ",".join(map(str, default))
    if isinstance(default, bool):
        return "default: on" if default else "default: off"
    return f"default: {default}"


def _field_help(cls: type, field: dataclasses.Field) -> str:
    """The field's help, or that of the same field in a base class (a subclass may only change the default)."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            for f in dataclasses.fields(klass):
                if f.name == field.name and f.metadata.get("help"):
                    return f.metadata["help"]
    return ""


def field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                     skip: Iterable[str] = (), required: Iterable[str] = (),
                     defaults: Mapping[str, Any] | None = None, help_overrides: Mapping[str, str] | None = None,
                     note: str = "") -> list[str]:
    """Add one flag per field of `cls` (fields already present on the parser are left as they are).

    `defaults` only changes the default shown in the help (the dataclass stays the source of truth);
    `required` fields must be given on the command line or in `--config`. Returns the field names added.
    """
    hints = typing.get_type_hints(cls)
    skip, required = set(skip), set(required)
    existing = {a.dest for a in parser._actions} if hasattr(parser, "_actions") else set()
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in existing or not f.init:
            continue
        kind = _base_type(hints[f.name])
        if kind is None:
            continue
        default = (defaults or {}).get(f.name, field_default(f))
        text = (help_overrides or {}).get(f.name) or _field_help(cls, f)
        shown = "required" if f.name in required else _default_text(f, default)
        if "(default" in text and f.name not in required:
            shown = ""  # the field's help already states its default in words
        parts = "; ".join(p for p in (shown, note) if p)
        options: dict[str, Any] = {"dest": f.name, "default": None,
                                   "help": f"{text} ({parts})" if parts else text}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            # ranges here (argparse's own error); `check` rules (device, model, PEFT method: they may import
            # torch) and cross-field bounds are applied by build_config, before any work all the same
            rules = {k: v for k, v in field_rules(cls, f.name).items() if k in ("min", "max", "gt", "lt", "finite")}
            options["type"] = _checked(kind, rules) if rules and kind in (int, float, str) else kind
            options["metavar"] = (f.name.upper() if kind is str else
                                  "A,B,..." if kind.__name__.startswith("list") else kind.__name__.upper())
            if "choices" in f.metadata:
                options["choices"] = list(f.metadata["choices"])
                options.pop("metavar")
        parser.add_argument("--" + f.name.replace("_", "-"), **options)
        added.append(f.name)
    return added


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` given on the command line (not None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def config_from_flags(cls: type, args: argparse.Namespace, *extra: Mapping[str, Any] | None,
                      required: Iterable[str] = ()) -> Any:
    """`cls` built from `--config FILE` (if the parser has it), then the flags, then `extra` layers."""
    config_path = getattr(args, "config", None)
    file_cfg = load_config_file(config_path) if config_path else {}
    layers = [file_cfg, flag_values(cls, args), *extra]
    missing = [name for name in required
               if not any((layer or {}).get(name) not in (None, "") for layer in layers)]
    if missing:
        raise RagError("missing required " + ", ".join("--" + m.replace("_", "-") for m in missing)
                       + (f" (give it as a flag or in {config_path})" if config_path else ""))
    return build_config(cls, *layers)


def document_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Append "(default: X)" to every optional flag whose help does not state it, in this parser and its
    sub-parsers, so that `--help` shows every default without each command writing it by hand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                document_defaults(sub)
            continue
        if (not action.option_strings or isinstance(action, argparse._HelpAction) or action.required
                or not action.help or action.help == argparse.SUPPRESS or "default" in action.help):
            continue
        default = action.default
        shown = ("off" if default is False else "none" if default in (None, [], "") else
                 ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default)
        action.help = f"{action.help} (default: {str(shown).replace('%', '%%')})"
    return parser


def add_config_file_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"JSON/YAML file of {what} fields (snake_case keys); flags override it (default: none)")


def number(kind: type, **rules: Any) -> Any:
    """argparse type for a plain flag: `kind` (int or float) held to core/config.py rules, e.g.
    `number(float, min=0, finite=True)`; a value out of range is argparse's one-line error."""
    return _checked(kind, rules)


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
