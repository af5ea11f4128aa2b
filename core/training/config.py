"""The options every trainer shares; the CLI turns them into flags (rag/flags.py).

Each numeric field carries its valid range in its metadata (core/config.py): the flags refuse a value out of
range, and `__post_init__` refuses it however the config was made (a `--config` file, a study, a test), so a
trainer never starts, nor writes its run folder, with a value it cannot use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from core.config import check_config


@dataclass
class TrainConfig:
    max_steps: int = field(default=300, metadata={"help": "optimizer steps", "min": 1})
    batch_size: int = field(default=32, metadata={"help": "examples per step", "min": 1})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (linear warm-up, then linear decay)",
                                              "gt": 0, "finite": True})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps", "min": 0})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "min": 0, "finite": True})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)", "min": 0, "finite": True})
    seed: int = field(default=0, metadata={"help": "seeds data order and initialisation", "min": 0,
                                           "max": 2**32 - 1})
    eval_every: int = field(default=100, metadata={"help": "evaluate on the dev set every N steps (0 = only at the end)",
                                                   "min": 0})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0 = only at the end)", "min": 0})
    log_every: int = field(default=10, metadata={"help": "write a curve row every N steps (0 = first and last only)",
                                                 "min": 0})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)",
                                                       "check": "device"})

    def __post_init__(self) -> None:
        check_config(self)
