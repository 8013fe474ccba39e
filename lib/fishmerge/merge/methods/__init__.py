"""Merge methods: a registry of small classes, each merging one chunk of one tensor in fp32.

Every method sees the same chunk of a tensor from each model (`thetas`), its λ weights, and
whatever it declares it needs (Fishers, the base model's chunk, per-tensor context computed
before chunking). The out-of-core executor (issue 4) streams chunks through `merge`; tests
check each formula against an independent numpy reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fishmerge.errors import FishmergeError


@dataclass
class MergeOptions:
    """Method options (the config's `fisher:` block and method parameters)."""

    floor: float = 1e-6
    favor_target: bool = True
    normalize: bool = False  # measured (brief): normalize=true hurt the 3-task MiniLM merge; λ search covers it
    scale: float = 1.0  # task_arithmetic / ties: base + scale · merged task vector
    density: float = 0.2  # ties: fraction of each task vector's entries kept
    fisher_norms: Sequence[float] | None = None  # normalize: one global ‖F_i‖₂ per model
    extra: dict = field(default_factory=dict)


class MergeMethod:
    """One merge formula. Subclasses set `name`, `needs_base`, `needs_fisher` and implement `merge`."""

    name = ""
    needs_base = False
    needs_fisher = False
    normalizes_weights = False  # λ normalised to sum 1 (fisher, isotropic)
    options_used: tuple[str, ...] = ()  # MergeOptions fields the formula reads (cache keys name only these)

    def check_weights(self, weights: Sequence[float]) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all():
            raise FishmergeError(f"merge weights must be finite and ≥ 0, got {list(weights)}")
        if w.sum() <= 0:
            raise FishmergeError(f"merge weights sum to {w.sum()}: give at least one model a positive weight")
        return w / w.sum() if self.normalizes_weights else w

    def merge(
        self,
        thetas: Sequence[np.ndarray],
        weights: np.ndarray,
        *,
        target: int = 0,
        fishers: Sequence[np.ndarray] | None = None,
        base: np.ndarray | None = None,
        options: MergeOptions | None = None,
        context: dict | None = None,
    ) -> np.ndarray:
        raise NotImplementedError


class Isotropic(MergeMethod):
    """θ* = Σ λᵢ θᵢ (λ normalised)."""

    name = "isotropic"
    normalizes_weights = True

    def merge(self, thetas, weights, **_):
        out = np.zeros(thetas[0].shape, dtype=np.float32)
        scratch = np.empty(thetas[0].shape, dtype=np.float32)
        for w, t in zip(weights, thetas):
            np.multiply(t, np.float32(w), out=scratch)
            out += scratch
        return out


class Fisher(MergeMethod):
    """θ* = Σ λᵢ F̃ᵢ θᵢ / Σ λᵢ F̃ᵢ, as in the paper's code.

    F̃ᵢ = max(Fᵢ, floor) for every model, or only for the target with `favor_target` (so a
    parameter with zero Fisher everywhere keeps the target's value); with `normalize`,
    λᵢ ← λᵢ / ‖Fᵢ‖₂ using one global norm per model.
    """

    name = "fisher"
    needs_fisher = True
    options_used = ("floor", "favor_target", "normalize")
    normalizes_weights = True

    def merge(self, thetas, weights, *, target=0, fishers=None, options=None, **_):
        opt = options or MergeOptions()
        lam = np.asarray(weights, dtype=np.float64)
        if opt.normalize:
            if opt.fisher_norms is None:
                raise FishmergeError("normalize needs the global Fisher norm of every model")
            lam = lam / np.asarray(opt.fisher_norms, dtype=np.float64)
        # Written as θ_target + Σ λᵢF̃ᵢ(θᵢ − θ_target) / Σ λᵢF̃ᵢ (the same quantity): where only the
        # target has Fisher mass the result is the target's value exactly, not up to rounding.
        anchor = thetas[target].astype(np.float32, copy=False)
        num = np.zeros(anchor.shape, dtype=np.float32)
        den = np.zeros(anchor.shape, dtype=np.float32)
        wf = np.empty(anchor.shape, dtype=np.float32)  # scratch buffers: few passes over memory per model
        diff = np.empty(anchor.shape, dtype=np.float32)
        for i, (w, t, f) in enumerate(zip(lam, thetas, fishers)):
            if not opt.favor_target or i == target:
                np.maximum(f, np.float32(opt.floor), out=wf)
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
        # there (e.g. vocabulary rows never seen): keep the target's value instead of 0/0.
        return anchor + np.divide(num, den, out=np.zeros_like(num), where=den > 0)


class TaskArithmetic(MergeMethod):
    """θ* = base + scale · Σ λᵢ (θᵢ − base) (λ as given)."""

    name = "task_arithmetic"
    needs_base = True
    options_used = ("scale",)

    def merge(self, thetas, weights, *, base=None, options=None, **_):
        opt = options or MergeOptions()
        b = base.astype(np.float32, copy=False)
        delta = np.zeros(b.shape, dtype=np.float32)
        for w, t in zip(weights, thetas):
            delta += np.float32(w) * (t.astype(np.float32, copy=False) - b)
        return b + np.float32(opt.scale) * delta


class Ties(MergeMethod):
    """TIES: trim each task vector to its top `density` magnitudes (per tensor), elect the sign of
    the λ-weighted sum, average the λ-weighted entries that agree with it (disjoint mean)."""

    name = "ties"
    needs_base = True
    options_used = ("scale", "density")

    def merge(self, thetas, weights, *, base=None, options=None, context=None, **_):
        opt = options or MergeOptions()
        b = base.astype(np.float32, copy=False)
        thresholds = (context or {}).get("ties_thresholds")
        if thresholds is None:
            raise FishmergeError(
                "ties needs per-tensor thresholds (fishmerge.merge.executor.ties_thresholds_streaming)"
            )
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
        return b + np.float32(opt.scale) * merged


METHODS: dict[str, MergeMethod] = {m.name: m for m in (Isotropic(), Fisher(), TaskArithmetic(), Ties())}


def get_method(name: str) -> MergeMethod:
    """The registered method called `name`, or an error listing the valid names."""
    if name not in METHODS:
        raise FishmergeError(f"unknown merge method '{name}': choose one of {', '.join(METHODS)}")
    return METHODS[name]
