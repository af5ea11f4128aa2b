"""Typed configs: dataclasses filled from a JSON/YAML file, then from CLI flags on top.

A field's metadata may carry validation rules besides its `help` (and `choices`):
`min` / `max` (inclusive bounds), `gt` / `lt` (exclusive bounds), `finite=True` (no nan/inf),
`at_most="other_field"` (a cross-field bound) and `check` (a callable that raises ValueError or RagError
with a message, or the name of one of CHECKS: "device", "model", "peft"). The ranges are enforced by the
CLI flag made from the field (rag/flags.py, an argparse error) and all rules by `build_config` (a
RagError), so a value from `--config FILE` is held to the flag's rules; a config class may also call
`check_config(self)` in `__post_init__` (TrainConfig does) to hold any construction to them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from core.errors import InputError, RagError

T = TypeVar("T")

RULE_KEYS = ("min", "max", "gt", "lt", "finite", "at_most", "check", "choices")


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise InputError("config file not found", path)
    if path.is_dir():
        raise InputError("is a folder; expected a JSON or YAML config file", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"invalid UTF-8 at byte {exc.start}", path) from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - both parsers' errors (nesting too deep included) become one message
        raise InputError(f"cannot parse config: {' '.join(str(exc).split())}", path) from None
    if not isinstance(data, dict):
        raise InputError("a config file must hold a mapping", path)
    return data


# ---------------------------------------------------------------- validation rules

def field_rules(cls: type, name: str) -> dict[str, Any]:
    """The rules of field `name`, from its metadata or that of the same field in a base class
    (a subclass that only changes a default, `max_steps: int = 200`, keeps its base's rules)."""
    rules: dict[str, Any] = {}
    for klass in getattr(cls, "__mro__", (cls,)):
        if not dataclasses.is_dataclass(klass):
            continue
        for f in dataclasses.fields(klass):
            if f.name == name:
                for key in RULE_KEYS:
                    if key in f.metadata and key not in rules:
                        rules[key] = f.metadata[key]
    return rules


def _check_device(value: str) -> None:
    from core.models import check_device
    check_device(value)


def _check_model(value: str) -> None:
    from core.models import check_model
    check_model(value)


def _check_peft(value: str) -> None:
    from core.peft.registry import PEFT_METHODS  # imports torch: only when a config names a method
    if value not in PEFT_METHODS:
        raise RagError(f"unknown PEFT method {value!r}; allowed: {sorted(PEFT_METHODS)}")


# Named checks, so a config module can ask for one without importing what it needs (torch, the registry).
CHECKS: dict[str, Any] = {"device": _check_device, "model": _check_model, "peft": _check_peft}


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else str(value)


def check_value(value: Any, rules: Mapping[str, Any]) -> None:
    """Raise ValueError (its message says what is wrong, without the field's name) if `value` breaks
    one of `rules`. None is always accepted ("not set"); bounds are written so that nan fails them."""
    if value is None:
        return
    if "choices" in rules and value not in rules["choices"]:
        raise ValueError(f"must be one of {', '.join(map(str, rules['choices']))}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (rules.get("finite") or any(k in rules for k in ("min", "max", "gt", "lt"))) \
                and isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {_number(value)}")
        if "min" in rules and not value >= rules["min"]:
            raise ValueError(f"must be at least {rules['min']}, got {_number(value)}")
        if "gt" in rules and not value > rules["gt"]:
            raise ValueError(f"must be greater than {rules['gt']}, got {_number(value)}")
        if "max" in rules and not value <= rules["max"]:
            raise ValueError(f"must be at most {rules['max']}, got {_number(value)}")
        if "lt" in rules and not value < rules["lt"]:
            raise ValueError(f"must be less than {rules['lt']}, got {_number(value)}")
    if "check" in rules:
        check = CHECKS[rules["check"]] if isinstance(rules["check"], str) else rules["check"]
        try:
            check(value)
        except RagError as exc:
            raise ValueError(str(exc)) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(inner[0]) if len(inner) == 1 else None
    return annotation if annotation in (int, float, bool) else None


def _coerce(cls: type, name: str, value: Any, hints: Mapping[str, Any]) -> Any:
    """Numbers and switches as the flags would parse them: "1e-4" (YAML 1.1 reads it as a string) -> 1e-4;
    a bool, a float or text where an integer belongs is an error rather than a crash later."""
    kind = _base_type(hints.get(name))
    if value is None or kind is None:
        return value
    what = {int: "an integer", float: "a number", bool: "true or false"}[kind]
    bad = RagError(f"{_flag(name)} (config key {name}): expected {what}, got {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise bad from None
    raise bad


def check_config(config: Any) -> None:
    """Apply every field's rules (and the cross-field `at_most` bounds) to a config instance;
    raise RagError naming the field and its flag."""
    cls = type(config)
    for f in dataclasses.fields(config):
        rules = field_rules(cls, f.name)
        if not rules:
            continue
        value = getattr(config, f.name)
        try:
            check_value(value, rules)
        except ValueError as exc:
            raise RagError(f"{_flag(f.name)} (config key {f.name}): {exc}") from None
        other = rules.get("at_most")
        if other and value is not None and getattr(config, other, None) is not None \
                and value > getattr(config, other):
            raise RagError(f"{_flag(f.name)} (config key {f.name}): must be at most {_flag(other)} "
                           f"= {getattr(config, other)}, got {value}")


def build_config(cls: type[T], *layers: dict[str, Any] | None) -> T:
    """Merge layers left to right (None values are skipped) into `cls`; unknown keys are an error, and
    every value is held to its field's rules (see the module doc), whichever layer it came from."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no coercion
        hints = {}
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise RagError(f"unknown {cls.__name__} option {key!r}; allowed: {', '.join(sorted(names))}")
            if value is not None:
                merged[key] = _coerce(cls, key, value, hints)
    config = cls(**merged)
    check_config(config)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def opt(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its help text (shown by every CLI flag made from it), optional `choices`, and
    optional validation rules: `min`, `max`, `gt`, `lt`, `finite`, `at_most`, `check` (see the module doc)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})
