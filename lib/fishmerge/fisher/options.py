"""The Fisher estimation options, declared once: the config's `fisher:` block, `FisherSpec` and the
`fishmerge fisher` flags all read their names, types, defaults and help from `FisherOptions`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fishmerge.fisher.engine import DEFAULT_MAX_MEMORY
from fishmerge.fisher.estimators import AUTO, DEFAULT_ESTIMATOR, ESTIMATORS, get_estimator
from fishmerge.fisher.statistics import FISHER, STATISTICS, check_statistics
from fishmerge.schema import Strict, at_least
from fishmerge.sizes import parse_size

DTYPES = ("auto", "float32", "bfloat16", "float16")


class FisherOptions(Strict):
    """How a Fisher is estimated: what names it (estimator, examples, seed, max_length) and how it is
    computed (batch, dtype, memory, fallback). The device is the execution's (`--device`, `execution.device`)."""

    estimator: Literal[(AUTO, *ESTIMATORS)] = Field(
        DEFAULT_ESTIMATOR,
        description=f"{AUTO}: {ESTIMATORS[0]} for classifiers, sampled for causal LMs; "
        + "; ".join(f"{n}: {get_estimator(n).description}" for n in ESTIMATORS),
    )
    examples: int = Field(1000, description="N examples chosen by the seed (all if N ≥ rows)")
    seed: int = Field(0, description="seed of the example selection and of sampled labels")
    batch_size: int = Field(16, description="examples per forward/backward pass")
    max_length: int = Field(128, description="truncate/pad tokens to at most this length")
    dtype: Literal[DTYPES] = Field("auto", description="model dtype during estimation (auto: the checkpoint's)")
    max_memory: int = Field(
        DEFAULT_MAX_MEMORY, description="bound on per-example gradient tensors held at once (e.g. 256MB, 2GiB)"
    )
    fallback: Literal["vmap", "error"] = Field(
        "vmap", description="modules without a per-layer rule: vmap(grad) fallback, or reject them"
    )
    statistics: list[Literal[STATISTICS]] = Field(
        default_factory=lambda: [FISHER],
        description="what the pass accumulates, a[,b]: fisher (diagonal Fisher), gram (Linear input Grams, for regmean)",
    )

    _counts = at_least(1, "examples", "batch_size", "max_memory")
    _length = at_least(2, "max_length")

    @field_validator("statistics", mode="before")
    @classmethod
    def _statistics(cls, v):
        if isinstance(v, str):  # the CLI's a,b
            v = [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, list | tuple) and not v:
            raise ValueError(f"names no statistic: choose one or more of {', '.join(STATISTICS)}")
        return v

    @field_validator("statistics")
    @classmethod
    def _canonical(cls, v: list[str]) -> list[str]:
        return list(check_statistics(v))

    @field_validator("max_memory", mode="before")
    @classmethod
    def _size(cls, v):
        if isinstance(v, bool):
            raise ValueError(f"not a size: {v!r} (try 512MB)")
        return parse_size(v) if isinstance(v, str) else v
