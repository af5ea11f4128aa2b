"""The flags every trainer shares (`--max-steps --batch-size --lr --seed --eval-every --save-every --resume`)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "examples per step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (linear warm-up, then linear decay)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    seed: int = field(default=0, metadata={"help": "seeds data order and initialisation"})
    eval_every: int = field(default=100, metadata={"help": "evaluate on the dev set every N steps (0 = only at the end)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    log_every: int = field(default=10, metadata={"help": "write a curve row every N steps"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})


def add_train_flags(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None) -> None:
    """Add the shared trainer flags; defaults come from the trainer's own config class."""
    defaults = defaults or TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind: Any = {int: int, float: float}.get(type(getattr(defaults, f.name)), str)
        parser.add_argument(flag, type=kind, default=None, help=f"{f.metadata.get('help', '')} "
                            f"(default {getattr(defaults, f.name)})")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")


def own_flags(config_cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The flags a trainer's config adds on top of TrainConfig, as given on the command line (None = not given)."""
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
            if f.name not in shared and getattr(args, f.name, None) is not None}


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None}
