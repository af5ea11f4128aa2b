"""The options every trainer shares; the CLI turns them into flags (rag/flags.py)."""
from __future__ import annotations

from dataclasses import dataclass, field


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
