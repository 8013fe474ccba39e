"""The building blocks of every validated options model (config sections, Fisher options, method parameters)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator


class Strict(BaseModel):
    """Unknown keys are errors; NaN and ±Inf never pass as numbers (they would reach tensors)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def at_least(low: float, *names: str):
    """A field validator: each named number (None allowed) must be ≥ low."""

    def check(cls, v):
        if v is not None and v < low:
            raise ValueError(f"must be ≥ {low:g}, got {v}")
        return v

    return field_validator(*names)(classmethod(check))
