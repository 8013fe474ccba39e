"""RegMean (Jin et al., ICLR 2023): each Linear weight merged in closed form from its input Grams.

For a weight read as y = x Wᵀ (nn.Linear, W out × in), W* = (Σᵢ λᵢ Wᵢ G̃ᵢ)(Σᵢ λᵢ G̃ᵢ)⁻¹ — the
minimiser of Σᵢ λᵢ ‖Xᵢ W*ᵀ − Xᵢ Wᵢᵀ‖²; its rows are independent, so a block of rows is merged on its
own; for y = x W (HF Conv1D, W in × out), W* = (Σ λᵢ G̃ᵢ)⁻¹ Σ λᵢ G̃ᵢ Wᵢ, merged whole.
Gᵢ is model i's mean input Gram Σ xxᵀ / tokens (as the paper's code: every model counts alike
whatever its data size), G̃ = α·G + (1 − α)·diag(G) shrinks the off-diagonal entries (α = 1, the
paper code's default, leaves G as it is; its emotion/NER configs use 0.1–0.9). The system is solved
in fp64 after a Cholesky check, so a singular one stops the merge with a readable error. Every
tensor without Grams (embeddings, norms, biases, a tied LM head) is merged by `rest`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, Field

from fishmerge.errors import FishmergeError
from fishmerge.fisher.statistics import FISHER, GRAM, LAYOUT_IN_OUT, LAYOUT_OUT_IN
from fishmerge.merge.methods.base import MergeMethod, get_method, register_method
from fishmerge.merge.methods.fisher import FisherParams

AUTO = "auto"
RESTS = ("fisher", "isotropic")
DEFAULT_ALPHA = 1.0  # the paper code's default (regmean_reduce_nondiag < 0: no reduction)


class SingularGramSystem(FishmergeError):
    """Σλ G̃ of a weight is not positive definite: its closed form has no unique solution."""


def _unit(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"must be in [0, 1] (1: the Grams as they are, 0: their diagonals only), got {v}")
    return v


class RegmeanParams(FisherParams):
    """α and the method for tensors without Grams; floor/favor_target/normalize (the `fisher:` block's)
    apply when that method is `fisher`."""

    alpha: Annotated[float, AfterValidator(_unit)] = Field(
        DEFAULT_ALPHA, description="G̃ = α·G + (1−α)·diag(G): scales the Grams' off-diagonal entries"
    )
    rest: Literal[(AUTO, *RESTS)] = Field(
        AUTO,
        description="tensors without Grams: fisher, isotropic, or auto (fisher when every model's store has Fishers)",
    )


RCOND = 1e-10  # (min/max of the Cholesky factor's diagonal)²: below it, the system is singular in fp32 data


def solve_regmean(thetas, weights, grams, layout: str, alpha: float, key: str = "") -> np.ndarray:
    """The closed form for one weight (or a block of a Linear weight's rows): each Gram read when it is
    reached, shrunk into a fresh fp64 copy (the caller's array is never changed) and added up."""
    if layout not in (LAYOUT_OUT_IN, LAYOUT_IN_OUT):
        raise FishmergeError(f"'{key}': unknown Gram layout '{layout}' (out_in or in_out)")
    lhs = rhs = None
    for i, (w, theta) in enumerate(zip(weights, thetas)):
        gram = np.asarray(grams[i], dtype=np.float64)
        g = gram * float(w)  # G̃ᵢ·λᵢ, fresh: α scales its off-diagonal entries in place
        if alpha != 1.0:
            diag = np.diagonal(g).copy()
            g *= alpha
            np.fill_diagonal(g, diag)
        del gram
        t = np.asarray(theta, dtype=np.float64)
        term = t @ g if layout == LAYOUT_OUT_IN else g @ t
        del t
        lhs = g if lhs is None else np.add(lhs, g, out=lhs)
        del g
        rhs = term if rhs is None else np.add(rhs, term, out=rhs)
        del term
    try:  # Σλ G̃ is symmetric PSD: positive definite iff the system is solvable
        factor_diag = np.diagonal(np.linalg.cholesky(lhs)).copy()
        ill = (factor_diag.min() / factor_diag.max()) ** 2 < RCOND
    except np.linalg.LinAlgError:
        ill = True
    if ill:
        dead = int((np.diagonal(lhs) <= 0).sum())
        if dead:
            why = f"{dead} input feature(s) are zero in every model: no α helps; merge by another method"
        else:
            why = (
                "its inputs span too few directions: give more data (tokens ≥ the input width) or lower "
                "regmean.alpha (e.g. 0.9 shrinks the off-diagonal entries)"
            )
        raise SingularGramSystem(
            f"regmean: the Gram system of '{key}' is singular ({why}). Nothing was written at the output."
        )
    if layout == LAYOUT_OUT_IN:
        return np.linalg.solve(lhs, rhs.T).T.astype(np.float32)  # W* A = B, A symmetric
    return np.linalg.solve(lhs, rhs).astype(np.float32)


@register_method
class Regmean(MergeMethod):
    name = "regmean"
    Params = RegmeanParams
    config_section = "regmean"  # alpha, rest sit in the config's `regmean:` block
    borrows = ("fisher",)  # floor, favor_target, normalize: from the `fisher:` block
    per_target = True  # with rest = fisher and favor_target, the other tensors depend on the target
    normalizes_weights = True  # the closed form is invariant to a common scale of λ
    bytes_per_model = 8  # the rest's Fisher rows (when rest = fisher)

    def statistics(self, params):
        return (GRAM, *((FISHER,) if params.rest == FISHER else ()))

    def resolve_params(self, params, available):
        if params.rest != AUTO:
            return params
        return params.model_copy(update={"rest": FISHER if FISHER in available else "isotropic"})

    def gram_cost(self, n_models: int, width: int) -> tuple[int, int]:
        # fixed: one Gram read (fp32), widened (fp64) and scaled (fp64) at a time, the accumulated system and
        # its factor (fp64); per element: θ widened, its product with G̃, the accumulated right side, the
        # solution (fp64) and the fp32 result
        return width * width * (4 + 8 + 8 + 8 + 8), 8 + 8 + 8 + 8 + 4

    def prepasses(self, params):
        return get_method(params.rest).prepasses(params) if params.rest in RESTS else []

    def describe(self, params, sep=" "):
        rest = get_method(params.rest).describe(params, sep) if params.rest == "fisher" else ""
        return f"alpha={params.alpha:g}{sep}rest={params.rest}" + (f"{sep}({rest})" if rest else "")

    def tracked_params(self, params):
        out = {"alpha": params.alpha, "rest": params.rest}
        if params.rest == "fisher":
            out.update(get_method("fisher").tracked_params(params))
        return out

    def merge(self, thetas, weights, *, params, grams=None, layout=None, key="", **kwargs):
        if grams is not None:
            return solve_regmean(thetas, weights, grams, layout, params.alpha, key)
        if params.rest not in RESTS:
            raise FishmergeError(f"regmean: rest '{params.rest}' was not resolved before merging '{key}'")
        return get_method(params.rest).merge(thetas, weights, params=params, key=key, **kwargs)
