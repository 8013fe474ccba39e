"""Task arithmetic: θ* = base + scale · Σ λᵢ (θᵢ − base), λ as given."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fishmerge.merge.methods.base import MergeMethod, register_method
from fishmerge.schema import Strict


class ScaleParams(Strict):
    scale: float = Field(1.0, description="base + scale · merged task vector")


@register_method
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    Params = ScaleParams
    needs_base = True
    bytes_fixed = 6  # the base's rows: raw and fp32

    def merge(self, thetas, weights, *, params, base=None, **_):
        b = base.astype(np.float32, copy=False)
        delta = np.zeros(b.shape, dtype=np.float32)
        for w, t in zip(weights, thetas):
            delta += np.float32(w) * (t.astype(np.float32, copy=False) - b)
        return b + np.float32(params.scale) * delta
