"""What a merge method declares, and the registry the config, planner, executor, λ search and
tracking read (none of them branches on a method's name).

A method is one module: a `MergeMethod` subclass decorated with `@register_method`, declaring its
parameters (`Params`, a pydantic model with defaults and validators; `config_section` says whether
their keys sit at the config's top level or in a block such as `fisher:`; `borrows` names methods
whose parameters it also reads, from their own sections), what it needs (base model, statistics:
Fishers, Grams), whether its result depends on the target, its working bytes per element for the
planner, its pre-passes over the whole inputs, and its formula on one chunk of one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fishmerge.errors import FishmergeError
from fishmerge.fisher.statistics import FISHER
from fishmerge.schema import Strict

if TYPE_CHECKING:
    from fishmerge.merge.plan import MergePlan

RunTasks = Callable[[list, str], list]  # (Dask delayed tasks, progress label) -> their results, in order


class NoParams(Strict):
    """A method without parameters."""


@dataclass(frozen=True)
class Prepass:
    """A per-merge statistic computed from the whole inputs before any block is merged.

    `run(plan, run_tasks)` returns a JSON-able value stored in the merge context under `name`
    (cached in the staging folder, so a resumed merge does not recompute it); `passes` is how many
    full reads of the inputs it costs (the planner's time estimate); `recorded` values are written
    into each target's lineage (fishmerge.json).
    """

    name: str
    run: Callable[[MergePlan, RunTasks], Any]
    passes: int = 1
    recorded: bool = False


class MergeMethod:
    """One merge formula and what it declares. Subclasses set the class attributes and `merge`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Strict]] = NoParams
    config_section: ClassVar[str | None] = None  # None: the parameters are top-level config keys
    needs_base: ClassVar[bool] = False
    needs_fisher: ClassVar[bool] = False
    borrows: ClassVar[tuple[str, ...]] = ()  # methods whose parameters `Params` includes (read from their sections)
    per_target: ClassVar[bool] = False  # the result differs per target (else merged once, written to each)
    normalizes_weights: ClassVar[bool] = False  # λ normalised to sum 1
    bytes_per_model: ClassVar[int] = 0  # working bytes per merged element and model, beyond the weights
    bytes_fixed: ClassVar[int] = 0  # working bytes per merged element, once

    def check_weights(self, weights: Sequence[float]) -> np.ndarray:
        """λ as the formula uses them: finite, ≥ 0, not all 0; normalised when the method says so."""
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all():
            raise FishmergeError(f"merge weights must be finite and ≥ 0, got {list(weights)}")
        if w.sum() <= 0:
            raise FishmergeError(f"merge weights sum to {w.sum()}: give at least one model a positive weight")
        return w / w.sum() if self.normalizes_weights else w

    def statistics(self, params: Strict) -> tuple[str, ...]:
        """The merge statistics the formula reads with these parameters ("fisher", "gram")."""
        return (FISHER,) if self.needs_fisher else ()

    def resolve_params(self, params: Strict, available: Sequence[str]) -> Strict:
        """The parameters with every choice left to the inputs made, knowing the statistics `available`
        for every model (e.g. regmean's `rest: auto`); as they are by default."""
        return params

    def gram_cost(self, n_models: int, width: int) -> tuple[int, int]:
        """Working bytes of one Gram-merged task beyond the block's usual ones: (fixed, for the Grams of
        input width `width`; per merged element)."""
        return 0, 0

    def search_candidates(self, params: Strict, lambdas: Sequence[Sequence[float]]) -> list[tuple[Strict, list[float]]]:
        """(parameters, λ) pairs the validation search tries: by default every λ candidate with the configured
        parameters; a method whose strength is a parameter (task arithmetic's scale) searches that instead."""
        return [(params, [float(w) for w in lam]) for lam in lambdas]

    def prepasses(self, params: Strict) -> list[Prepass]:
        """Statistics over the whole inputs the formula needs with these parameters (none by default)."""
        return []

    def describe(self, params: Strict, sep: str = " ") -> str:
        """The parameters as people read them (plan text, model card)."""
        items = params.model_dump()
        return sep.join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items()) or "none"

    def tracked_params(self, params: Strict) -> dict[str, Any]:
        """The parameters logged as MLflow params (exactly those the formula reads)."""
        return params.model_dump(mode="json")

    def merge(
        self,
        thetas: Sequence[np.ndarray],
        weights: np.ndarray,
        *,
        params: Strict,
        target: int = 0,
        fishers: Sequence[np.ndarray] | None = None,
        base: np.ndarray | None = None,
        context: dict | None = None,
        key: str = "",
        grams: Sequence[np.ndarray] | None = None,
        layout: str | None = None,
    ) -> np.ndarray:
        """Merge one chunk of tensor `key` (fp32) from every model; `context` holds the pre-passes' values.
        For a tensor merged by its Grams, the chunk is the whole tensor, `grams` the models' mean input
        Grams Σxxᵀ/tokens (fp64, read one at a time when iterated) and `layout` the weight's orientation."""
        raise NotImplementedError


METHODS: dict[str, MergeMethod] = {}


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: add a method to the registry (its name must be new)."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"merge method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> MergeMethod:
    """The registered method called `name`, or an error listing the valid names."""
    if name not in METHODS:
        raise FishmergeError(f"unknown merge method '{name}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


def own_fields(method: MergeMethod) -> dict:
    """The fields of a method's `Params` it declares itself (not those of the methods it borrows from)."""
    borrowed = {n for other in method.borrows for n in get_method(other).Params.model_fields}
    return {n: f for n, f in method.Params.model_fields.items() if n not in borrowed}


def params_in_section(section: str | None) -> dict[str, tuple]:
    """(annotation, field) of every registered method's parameters whose keys sit in config `section`
    (None: the top level); methods sharing a parameter must declare it identically (e.g. by inheritance)."""
    out: dict[str, tuple] = {}
    for method in METHODS.values():
        if method.config_section != section:
            continue
        for name, field in own_fields(method).items():
            if name in out and (out[name][1].default != field.default or out[name][0] != field.annotation):
                raise ValueError(f"merge methods declare parameter '{name}' differently")
            out[name] = (field.annotation, field)
    return out
