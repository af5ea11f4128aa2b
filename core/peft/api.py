"""The method-independent API: build configs, apply, count, save and load.

Checkpoints are two files: ``peft_config.json`` (method name + config fields) and
``peft_weights.safetensors`` (only the trained parameters, by their names in the adapted model).
Loading re-applies the method to a fresh base model and then fills in those parameters, so no
code or pickle is ever read from disk.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.peft.config import PeftError, PeftMethodConfig
from core.peft.layers import model_width
from core.peft.registry import PEFT_METHODS, PeftMethod
from core.peft.wrapping import inner_model, replace_inner_model

CONFIG_FILE = "peft_config.json"
WEIGHTS_FILE = "peft_weights.safetensors"
FORMAT_VERSION = 1
_TAG = "_rag_peft_method"  # (name, config) recorded on the model apply_peft returns


def _method(name: str) -> PeftMethod:
    try:
        return PEFT_METHODS[name]
    except (KeyError, TypeError):
        raise PeftError(f"unknown PEFT method {name!r}; allowed: {sorted(PEFT_METHODS)}") from None


def peft_config(name: str, **overrides: Any) -> PeftMethodConfig:
    """The typed default config of ``name`` with ``overrides`` (``rank=`` maps to the method's rank field)."""
    return _method(name).config_cls.from_dict(overrides)


def parse_peft_options(name: str, text: str | None) -> dict[str, Any]:
    """``--peft-options "placement=houlsby,init=small"``: the method's fields as typed values (int, float, bool,
    str by the field's default), each name and value checked now, before any model is loaded."""
    import dataclasses

    if not text or not text.strip():
        return {}
    fields = {f.name: f for f in dataclasses.fields(_method(name).config_cls)}
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise PeftError(f"--peft-options: {item.strip()!r} is not KEY=VALUE (e.g. placement=houlsby,init=small)")
        if key not in fields:
            raise PeftError(f"--peft-options: {name} has no option {key!r}; its options are {sorted(fields)}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("true", "1")
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            raise PeftError(f"--peft-options: {key}={raw!r} is not a {type(default).__name__}") from None
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise PeftError(f"--peft-options: {key} must be one of {', '.join(map(str, choices))}, not {raw!r}")
        out[key] = value
    return out


def method_overrides(config: Any) -> dict[str, Any]:
    """The PEFT overrides a trainer config asks for: ``rank`` and ``peft_options`` (when the config has them)."""
    out = {} if getattr(config, "rank", None) is None else {"rank": config.rank}
    out.update(parse_peft_options(config.peft, getattr(config, "peft_options", None)))
    return out


def apply_peft(model: nn.Module, name: str, config: PeftMethodConfig | None = None,
               **overrides: Any) -> nn.Module:
    """Freeze the base model, add the method's parameters and return the model to train and use.

    ``model`` may be a HF model or a SentenceTransformer (its ``model[0].auto_model`` is
    adapted). The returned object is the model itself for in-place methods, or peft's wrapper
    for prefix tuning (for a SentenceTransformer the wrapper is put inside it).
    """
    method = _method(name)
    if config is None:
        config = method.config_cls.from_dict(overrides)
    elif type(config) is not method.config_cls:
        raise PeftError(f"method {name!r} takes a {method.config_cls.__name__}, got {type(config).__name__}")
    elif overrides:
        config = config.replace(**overrides)
    inner = inner_model(model)
    config.check_width(model_width(inner))
    result = replace_inner_model(model, method.apply(inner, config))
    object.__setattr__(result, _TAG, (name, config))
    return result


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that require gradients, detached, contiguous and on the CPU."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts (shared weights counted once) and their ratio."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_fraction": trainable / total if total else 0.0}


def save_peft(model: nn.Module, out_dir: str | Path, name: str | None = None,
              config: PeftMethodConfig | None = None) -> Path:
    """Write the config JSON and the trained weights (safetensors); name/config default to apply_peft's."""
    tagged_name, tagged_config = getattr(model, _TAG, (None, None))
    name = name or tagged_name
    config = config or (tagged_config if name == tagged_name else None)
    if name is None:
        raise PeftError("save_peft: pass the method name (the model was not returned by apply_peft)")
    method = _method(name)
    config = config or method.config_cls()
    if type(config) is not method.config_cls:
        raise PeftError(f"method {name!r} takes a {method.config_cls.__name__}, got {type(config).__name__}")
    weights = trainable_state_dict(model)
    if not weights:
        raise PeftError("save_peft: the model has no trainable parameters")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"method": name})
    meta = {"format_version": FORMAT_VERSION, "method": name, "config": config.to_dict()}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load_peft(base_model: nn.Module, in_dir: str | Path) -> nn.Module:
    """Re-apply the saved method to ``base_model`` and load its trained weights (names must match)."""
    src = Path(in_dir)
    try:
        meta = json.loads((src / CONFIG_FILE).read_text())
        name, values = meta["method"], meta["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PeftError(f"{src / CONFIG_FILE}: not a readable PEFT config ({err})") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise PeftError(f"{src / CONFIG_FILE}: unsupported format_version {meta.get('format_version')!r}")
    config = _method(name).config_cls.from_dict(values)
    model = apply_peft(base_model, name, config)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    weights = config.legacy_weights(load_file(str(src / WEIGHTS_FILE)), params)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise PeftError(f"{src / WEIGHTS_FILE} does not match the '{name}' model: "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for n, p in params.items():
            if weights[n].shape != p.shape:
                raise PeftError(f"{n}: saved shape {tuple(weights[n].shape)} != model shape {tuple(p.shape)}")
            p.copy_(weights[n])
    return model
