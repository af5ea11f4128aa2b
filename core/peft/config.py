"""Base class for every method's typed config, and the error the package raises.

Configs are plain dataclasses so they round-trip through JSON (``peft_config.json``) without
pickle; each field carries its help text in ``metadata["help"]`` like huggingface/peft.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from core.errors import RagError


class PeftError(RagError, ValueError):
    """A bad method name, field, rank or checkpoint: a ValueError the CLI can print plainly."""


@dataclass
class PeftMethodConfig:
    """Common behaviour: validation of the size knob ("rank") and dict round-tripping.

    ``rank_field`` names the field that plays the role of the rank (``r`` for bottleneck
    methods, ``num_virtual_tokens`` for prefix tuning) so ``peft_config(name, rank=...)`` works
    for every method. ``rank_bounded_by_width`` says whether that rank must fit in the hidden
    size (true for bottlenecks, meaningless for a count of virtual tokens).
    """

    rank_field: ClassVar[str | None] = None
    rank_bounded_by_width: ClassVar[bool] = True

    def __post_init__(self) -> None:
        rank = self.rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
            raise PeftError(f"{type(self).__name__}.{self.rank_field} must be a positive integer, got {rank!r}")

    @property
    def rank(self) -> int | None:
        return None if self.rank_field is None else getattr(self, self.rank_field)

    def check_width(self, width: int | None) -> None:
        """Reject a bottleneck wider than the model: it would add parameters without compressing."""
        if width is None or not self.rank_bounded_by_width or self.rank is None:
            return
        if self.rank > width:
            raise PeftError(
                f"{type(self).__name__}.{self.rank_field}={self.rank} exceeds the model's hidden size "
                f"{width}; it must be between 1 and {width}")

    def legacy_weights(self, weights: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """Saved weights (by name) made to fit a model adapted with this config, for checkpoints written by
        an earlier version of the method; ``params`` are the model's trainable parameters. Default: as saved."""
        return weights

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PeftMethodConfig:
        """Build from a dict, accepting ``rank`` as an alias and naming any unknown key."""
        values = dict(values)
        if "rank" in values and "rank" not in cls.field_names():
            if cls.rank_field is None:
                raise PeftError(f"{cls.__name__} has no rank; its fields are {cls.field_names()}")
            if cls.rank_field in values:
                raise PeftError(f"give either rank or {cls.rank_field}, not both")
            values[cls.rank_field] = values.pop("rank")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise PeftError(f"unknown field(s) {unknown} for {cls.__name__}; allowed: {cls.field_names()}")
        return cls(**values)

    def replace(self, **overrides: Any) -> PeftMethodConfig:
        return type(self).from_dict({**self.to_dict(), **overrides})
