"""Task arithmetic: θ* = base + scale · Σ λᵢ (θᵢ − base), λ as given.

Searched on validation as in Ilharco et al. (2023): λᵢ = 1 and the scale from SEARCHED_SCALES (scale 1/K
is the plain average of K models)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fishmerge.merge.methods.base import MergeMethod, register_method
from fishmerge.schema import Strict

SEARCHED_SCALES = (0.3, 0.5, 0.7, 1.0, 1.3)  # the scales the validation search tries


def unit_weights(lambdas) -> list[float]:
    """λᵢ = 1 for every model (the searches of methods whose strength is their scale)."""
    return [1.0] * len(lambdas[0]) if lambdas else []


class ScaleParams(Strict):
    scale: float = Field(1.0, description="base + scale · merged task vector")


@register_method
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    Params = ScaleParams
    needs_base = True
    bytes_fixed = 6  # the base's rows: raw and fp32

    def search_candidates(self, params, lambdas):
        return [(params.model_copy(update={"scale": s}), unit_weights(lambdas)) for s in SEARCHED_SCALES]

    def merge(self, thetas, weights, *, params, base=None, **_):
        b = base.astype(np.float32, copy=False)
        delta = np.zeros(b.shape, dtype=np.float32)
        for w, t in zip(weights, thetas):
            delta += np.float32(w) * (t.astype(np.float32, copy=False) - b)
        return b + np.float32(params.scale) * delta
