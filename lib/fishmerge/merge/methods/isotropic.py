"""Isotropic merging (simple averaging): θ* = Σ λᵢ θᵢ, λ normalised."""

from __future__ import annotations

import numpy as np

from fishmerge.merge.methods.base import MergeMethod, register_method


@register_method
class Isotropic(MergeMethod):
    name = "isotropic"
    normalizes_weights = True

    def merge(self, thetas, weights, **_):
        out = np.zeros(thetas[0].shape, dtype=np.float32)
        scratch = np.empty(thetas[0].shape, dtype=np.float32)
        for w, t in zip(weights, thetas):
            np.multiply(t, np.float32(w), out=scratch)
            out += scratch
        return out
