"""Typed configs: dataclasses filled from a JSON/YAML file, then from CLI flags on top."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from core.errors import InputError, RagError

T = TypeVar("T")


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - both parsers' errors become one clear message
        raise InputError(f"cannot parse config: {exc}", path) from None
    if not isinstance(data, dict):
        raise InputError("a config file must hold a mapping", path)
    return data


def build_config(cls: type[T], *layers: dict[str, Any] | None) -> T:
    """Merge layers left to right (None values are skipped) into `cls`; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            key = key.replace("-", "_")
            if key not in names:
                raise RagError(f"unknown {cls.__name__} option {key!r}; allowed: {', '.join(sorted(names))}")
            if value is not None:
                merged[key] = value
    return cls(**merged)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def opt(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its help text (shown by every CLI flag made from it) and optional `choices`."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})
