"""TIES merging (Yadav et al. 2023): trim each task vector to its top `density` magnitudes (per
tensor), elect the sign of the λ-weighted sum, average the λ-weighted entries that agree with it
(disjoint mean); θ* = base + scale · merged.

Trimming keeps the k = ⌊density·n⌋ largest |θᵢ − base| of each tensor of n entries, as mergekit
does (0.1.5, `sparsify.magnitude`), but at least one (where mergekit refuses to run). The k-th
largest magnitude is found exactly out of core by a pre-pass: two streaming passes of 65536-bin
histograms over the float32 bit patterns (monotone for non-negative floats).

Searched on validation with λᵢ = 1 over SEARCHED_DENSITIES × SEARCHED_SCALES (the paper tunes the scale
and keeps density 0.2; the grid adds a sparser and a denser trim).
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field

from fishmerge.errors import FishmergeError
from fishmerge.merge.inputs import base_rows, model_rows, row_blocks
from fishmerge.merge.methods.base import MergeMethod, Prepass, register_method
from fishmerge.merge.methods.task_arithmetic import ScaleParams, unit_weights

SEARCHED_DENSITIES = (0.1, 0.2, 0.4)
SEARCHED_SCALES = (0.5, 1.0, 1.5)


def _fraction(v: float) -> float:
    if not 0 < v <= 1:
        raise ValueError(f"density must be in (0, 1], got {v}")
    return v


class TiesParams(ScaleParams):
    density: Annotated[float, AfterValidator(_fraction)] = Field(0.2, description="fraction of each task vector kept")


def kept_entries(density: float, n: int) -> int:
    """How many entries of a task vector of n entries trimming keeps: ⌊density·n⌋, at least 1."""
    return max(1, math.floor(density * n))


def _hist(plan, m_index: int, key: str, r0: int, r1: int, bucket: int | None) -> np.ndarray:
    """Histogram of |θᵢ − base| float32 bit patterns: high 16 bits, or low 16 bits within one high bucket."""

    tv = model_rows(plan, m_index, key, r0, r1) - base_rows(plan, key, r0, r1)
    bits = np.abs(tv).ravel().view(np.uint32)
    if bucket is None:
        return np.bincount(bits >> 16, minlength=65536)
    return np.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=65536)


def _kth_largest_bucket(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(bucket holding the k-th largest value, how many values lie above that bucket)."""
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, k))
    bucket = 65535 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return bucket, above


def ties_thresholds(plan, run_tasks) -> dict[str, list[float]]:
    """Exact per-(tensor, model) k-th largest |θᵢ − base|, k = kept_entries(density, n)."""
    import dask

    def blocks(key):
        ref = plan.models[0].refs[key]
        return row_blocks(ref.rows, ref.row_elems, plan.block_elems)

    pairs = [(key, i) for key in plan.shared for i in range(len(plan.models))]
    plan_d = dask.delayed(plan, pure=True, traverse=False)

    def hist_pass(buckets):
        tasks = []
        for key, i in pairs:
            b = None if buckets is None else buckets[(key, i)][0]
            tasks.append([dask.delayed(_hist)(plan_d, i, key, r0, r1, b) for r0, r1 in blocks(key)])
        flat = [t for group in tasks for t in group]
        results = iter(run_tasks(flat, "ties thresholds"))
        return {p: sum(next(results) for _ in group) for p, group in zip(pairs, tasks)}

    first = hist_pass(None)
    buckets = {}
    for (key, i), hist in first.items():
        k = kept_entries(plan.params.density, math.prod(plan.models[0].refs[key].shape) or 1)
        buckets[(key, i)] = (*_kth_largest_bucket(hist, k), k)
    second = hist_pass(buckets)
    out: dict[str, list[float]] = {key: [0.0] * len(plan.models) for key in plan.shared}
    for (key, i), hist in second.items():
        bucket, above, k = buckets[(key, i)]
        low, _ = _kth_largest_bucket(hist, k - above)
        out[key][i] = float(np.array([(bucket << 16) | low], dtype=np.uint32).view(np.float32)[0])
    return out


@register_method
class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams
    needs_base = True
    bytes_fixed = 6  # the base's rows: raw and fp32

    def prepasses(self, params):
        return [Prepass("ties_thresholds", ties_thresholds, passes=2)]

    def search_candidates(self, params, lambdas):
        ones = unit_weights(lambdas)
        grid = [(d, s) for d in SEARCHED_DENSITIES for s in SEARCHED_SCALES]
        return [(params.model_copy(update={"density": d, "scale": s}), ones) for d, s in grid]

    def merge(self, thetas, weights, *, params, base=None, context=None, key="", **_):
        b = base.astype(np.float32, copy=False)
        thresholds = (context or {}).get("ties_thresholds", {}).get(key)
        if thresholds is None:
            raise FishmergeError(f"ties needs the per-tensor thresholds of '{key}' (the ties_thresholds pre-pass)")
        trimmed = []
        for t, thr in zip(thetas, thresholds):
            tv = t.astype(np.float32, copy=False) - b
            trimmed.append(np.where(np.abs(tv) >= thr, tv, np.float32(0)))
        weighted = [np.float32(w) * tv for w, tv in zip(weights, trimmed)]
        sign = np.sign(np.sum(weighted, axis=0))
        num = np.zeros(b.shape, dtype=np.float32)
        den = np.zeros(b.shape, dtype=np.float32)
        for w, wtv in zip(weights, weighted):
            agree = (np.sign(wtv) == sign) & (wtv != 0)
            num += np.where(agree, wtv, np.float32(0))
            den += np.where(agree, np.float32(w), np.float32(0))
        merged = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        return b + np.float32(params.scale) * merged
