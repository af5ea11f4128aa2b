"""``prefix``: prefix tuning via the peft library (trainable key/value prefixes in every layer).

Needs peft's ``PeftModel`` wrapper (prompt learning cannot be injected in place), so the
returned model is a ``PeftModelForFeatureExtraction`` for encoders (e.g. a BERT sentence
embedding encoder) or a ``PeftModelForSeq2SeqLM`` for encoder-decoders. Unlike the other
methods it changes attention from the first step, so outputs do not start at the base model's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from peft import PrefixTuningConfig, TaskType, get_peft_model
from torch import nn

from core.peft.config import PeftError, PeftMethodConfig

_TASK_TYPES = sorted(t.value for t in TaskType)


@dataclass
class PrefixConfig(PeftMethodConfig):
    """Prefix tuning; the "rank" is the number of virtual tokens (not bounded by the hidden size)."""

    rank_field = "num_virtual_tokens"
    rank_bounded_by_width = False

    num_virtual_tokens: int = field(default=20, metadata={"help": "Number of trainable prefix positions per layer."})
    prefix_projection: bool = field(default=False, metadata={
        "help": "Reparameterise the prefix through a 2-layer MLP (more parameters, often more stable)."})
    encoder_hidden_size: int | None = field(default=None, metadata={
        "help": "Hidden size of that MLP; None uses the model's hidden size."})
    task_type: str | None = field(default=None, metadata={
        "help": "peft TaskType; None: SEQ_2_SEQ_LM for encoder-decoders, FEATURE_EXTRACTION otherwise."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_type is not None and self.task_type not in _TASK_TYPES:
            raise PeftError(f"unknown task_type {self.task_type!r}; allowed: {_TASK_TYPES}")


def apply_prefix(model: nn.Module, config: PrefixConfig) -> nn.Module:
    model_config = getattr(model, "config", None)
    is_seq2seq = bool(getattr(model_config, "is_encoder_decoder", False))
    task = config.task_type or (TaskType.SEQ_2_SEQ_LM if is_seq2seq else TaskType.FEATURE_EXTRACTION)
    extra = {} if config.encoder_hidden_size is None else {"encoder_hidden_size": config.encoder_hidden_size}
    peft_cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=config.num_virtual_tokens,
                                  prefix_projection=config.prefix_projection, **extra)
    try:
        return get_peft_model(model, peft_cfg)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise PeftError(f"peft prefix tuning does not support {type(model).__name__} "
                        f"(task {task}): {err}") from err
