"""Fisher merging (Matena & Raffel 2022): θ* = Σ λᵢ F̃ᵢ θᵢ / Σ λᵢ F̃ᵢ, as in the paper's code.

F̃ᵢ = max(Fᵢ, floor) for every model, or only for the target with `favor_target` (so a parameter
with zero Fisher everywhere keeps the target's value: the result depends on the target); with
`normalize`, λᵢ ← λᵢ / ‖Fᵢ‖₂ using one global norm per model (a pre-pass over every Fisher).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field

from fishmerge.errors import FishmergeError
from fishmerge.merge.inputs import fisher_rows, merge_blocks
from fishmerge.merge.methods.base import MergeMethod, Prepass, register_method
from fishmerge.schema import Strict


def _non_negative(v: float) -> float:
    if v < 0:
        raise ValueError(f"must be ≥ 0, got {v}")
    return v


class FisherParams(Strict):
    floor: Annotated[float, AfterValidator(_non_negative)] = Field(1e-6, description="F̃ = max(F, floor)")
    favor_target: bool = Field(True, description="floor only the target's Fisher (zero-Fisher entries keep it)")
    # measured (brief): normalize=true hurt the 3-task MiniLM merge
    normalize: bool = Field(False, description="divide each λᵢ by the global ‖Fᵢ‖₂")


def fisher_norms(plan, run_tasks) -> list[float]:
    """One global ‖Fᵢ‖₂ per model over every merged tensor, streamed block by block."""
    import dask

    def sq_sum(plan, i, key, r0, r1) -> float:
        f = fisher_rows(plan, i, key, r0, r1).astype(np.float64)
        return float((f * f).sum())

    plan_d = dask.delayed(plan, pure=True, traverse=False)  # one graph node, not walked per task
    tasks, owners = [], []
    for i in range(len(plan.models)):
        for key in plan.shared:
            for r0, r1 in merge_blocks(plan, key):
                tasks.append(dask.delayed(sq_sum)(plan_d, i, key, r0, r1))
                owners.append(i)
    totals = np.zeros(len(plan.models))
    for i, s in zip(owners, run_tasks(tasks, "fisher norms")):
        totals[i] += s
    if (totals <= 0).any():
        raise FishmergeError("normalize: a Fisher is zero on every merged tensor; set `normalize: false`")
    return [float(np.sqrt(t)) for t in totals]


@register_method
class Fisher(MergeMethod):
    name = "fisher"
    Params = FisherParams
    config_section = "fisher"  # floor, favor_target, normalize sit in the config's `fisher:` block
    needs_fisher = True
    per_target = True
    normalizes_weights = True
    bytes_per_model = 8  # the Fisher's rows (fp32) and the weighted-Fisher scratch

    def prepasses(self, params):
        return [Prepass("fisher_norms", fisher_norms, passes=1, recorded=True)] if params.normalize else []

    def merge(self, thetas, weights, *, params, target=0, fishers=None, context=None, **_):
        lam = np.asarray(weights, dtype=np.float64)
        if params.normalize:
            norms = (context or {}).get("fisher_norms")
            if norms is None:
                raise FishmergeError(
                    "normalize needs the global Fisher norm of every model (the fisher_norms pre-pass)"
                )
            lam = lam / np.asarray(norms, dtype=np.float64)
        # Written as θ_target + Σ λᵢF̃ᵢ(θᵢ − θ_target) / Σ λᵢF̃ᵢ (the same quantity): where only the
        # target has Fisher mass the result is the target's value exactly, not up to rounding.
        anchor = thetas[target].astype(np.float32, copy=False)
        num = np.zeros(anchor.shape, dtype=np.float32)
        den = np.zeros(anchor.shape, dtype=np.float32)
        wf = np.empty(anchor.shape, dtype=np.float32)  # scratch buffers: few passes over memory per model
        diff = np.empty(anchor.shape, dtype=np.float32)
        for i, (w, t, f) in enumerate(zip(lam, thetas, fishers)):
            if not params.favor_target or i == target:
                np.maximum(f, np.float32(params.floor), out=wf)
                wf *= np.float32(w)
            else:
                np.multiply(f, np.float32(w), out=wf)
            den += wf
            if i == target:
                continue  # θ_target − anchor = 0
            np.subtract(t, anchor, out=diff)
            diff *= wf
            num += diff
        # Σλ·F̃ = 0 happens with favor_target when the target's λ is 0 and no other model has mass
        # there (e.g. vocabulary rows never seen): keep the target's value instead of 0/0. Every weight
        # is 0 there, so num is too — unless a difference overflowed (0·inf): set to 0 all the same.
        # In place: no new float arrays of the tensor's size.
        live = den > 0
        np.divide(num, den, out=num, where=live)
        np.copyto(num, np.float32(0), where=~live)
        num += anchor
        return num
