"""Merge formulas against independent numpy references (float64, vectorised), chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest
from fishmerge.errors import FishmergeError
from fishmerge.merge.methods import get_method
from fishmerge.merge.methods.ties import kept_entries

SHAPE = (37, 11)


def inputs(k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)  # per test: results do not depend on test order
    thetas = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(k)]
    fishers = [(rng.random(SHAPE) ** 3).astype(np.float32) for _ in range(k)]
    base = rng.normal(size=SHAPE).astype(np.float32)
    return thetas, fishers, base


def chunked(method, thetas, weights, rows: int, **kw):
    """Merge row chunks separately and stitch: the executor's view of a tensor."""
    parts = []
    for s in range(0, SHAPE[0], rows):
        sl = slice(s, s + rows)
        extra = {k: v for k, v in kw.items() if k not in ("fishers", "base")}
        if "fishers" in kw:
            extra["fishers"] = [f[sl] for f in kw["fishers"]]
        if "base" in kw:
            extra["base"] = kw["base"][sl]
        parts.append(method.merge([t[sl] for t in thetas], weights, **extra))
    return np.concatenate(parts)


def rel(a, b) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("rows", [1, 5, 37])
def test_isotropic(rows) -> None:
    thetas, _, _ = inputs()
    m = get_method("isotropic")
    w = m.check_weights([2.0, 1.0, 1.0])
    ref = np.tensordot(np.array([0.5, 0.25, 0.25]), np.stack(thetas).astype(np.float64), axes=1)
    assert rel(chunked(m, thetas, w, rows), ref) <= 1e-6


@pytest.mark.parametrize("favor_target", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("rows", [3, 37])
def test_fisher(favor_target, normalize, rows) -> None:
    thetas, fishers, _ = inputs()
    fishers[1][:4] = 0.0  # exercise the floor
    m = get_method("fisher")
    lam = m.check_weights([0.5, 0.3, 0.2])
    norms = [float(np.sqrt((f.astype(np.float64) ** 2).sum())) for f in fishers]
    params = m.Params(floor=1e-3, favor_target=favor_target, normalize=normalize)
    F = np.stack(fishers).astype(np.float64)
    floored = np.maximum(F, 1e-3)
    if favor_target:
        floored[1:] = F[1:]
    coef = np.array([0.5, 0.3, 0.2]) / (np.array(norms) if normalize else 1.0)
    wf = coef[:, None, None] * floored
    ref = (wf * np.stack(thetas)).sum(0) / wf.sum(0)
    got = chunked(m, thetas, lam, rows, fishers=fishers, params=params, context={"fisher_norms": norms}, target=0)
    assert rel(got, ref) <= 1e-6


def test_fisher_with_equal_fishers_is_isotropic() -> None:
    thetas, fishers, _ = inputs()
    same = [fishers[0]] * 3
    iso = get_method("isotropic")
    fis = get_method("fisher")
    w = [0.6, 0.3, 0.1]
    a = fis.merge(thetas, fis.check_weights(w), fishers=same, params=fis.Params(floor=0.0))
    b = iso.merge(thetas, iso.check_weights(w), params=iso.Params())
    # Same quantity, different fp32 operation order: equal up to rounding of O(1) inputs.
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_zero_fisher_everywhere_keeps_the_target_with_favor_target() -> None:
    thetas, _, _ = inputs()
    zeros = [np.zeros(SHAPE, np.float32)] * 3
    m = get_method("fisher")
    out = m.merge(
        thetas,
        m.check_weights([0.2, 0.5, 0.3]),
        fishers=zeros,
        target=1,
        params=m.Params(floor=1e-6, favor_target=True),
    )
    np.testing.assert_array_equal(out, thetas[1])


@pytest.mark.parametrize("rows", [4, 37])
def test_task_arithmetic(rows) -> None:
    thetas, _, base = inputs()
    m = get_method("task_arithmetic")
    w = m.check_weights([0.7, 0.4, 0.2])
    ref = base + 0.8 * sum(c * (t.astype(np.float64) - base) for c, t in zip([0.7, 0.4, 0.2], thetas))
    got = chunked(m, thetas, w, rows, base=base, params=m.Params(scale=0.8))
    assert rel(got, ref) <= 1e-6


def _ties_reference(thetas, base, lam, density, scale):
    tvs = np.stack([t.astype(np.float64) - base for t in thetas])
    kept = np.zeros_like(tvs)
    for i, tv in enumerate(tvs):  # keep the top ⌊density·n⌋ magnitudes (by sorting), as mergekit 0.1.5 does
        k = int(density * tv.size)
        order = np.argsort(-np.abs(tv).ravel(), kind="stable")[:k]
        flat = np.zeros(tv.size)
        flat[order] = tv.ravel()[order]
        kept[i] = flat.reshape(tv.shape)
    weighted = np.asarray(lam)[:, None, None] * kept
    elected = np.sign(weighted.sum(0))
    agree = (np.sign(weighted) == elected) & (weighted != 0)
    den = (agree * np.asarray(lam)[:, None, None]).sum(0)
    num = (weighted * agree).sum(0)
    return base + scale * np.where(den > 0, num / np.where(den > 0, den, 1), 0)


@pytest.mark.parametrize("rows", [6, 37])
def test_ties(rows) -> None:
    thetas, _, base = inputs()
    m = get_method("ties")
    lam = [1.0, 0.5, 0.8]
    # Thresholds by full sort (the k-th largest magnitude per model, k = ⌊density·n⌋ = 122 of 407 here,
    # where ⌈density·n⌉ would keep 123), independently of the executor's streaming histogram
    # (tests/test_merge_engine.py checks that one end to end).
    k = int(0.3 * base.size)
    assert k == kept_entries(0.3, base.size) == 122
    thr = [float(np.sort(np.abs((t.astype(np.float32) - base).ravel()))[::-1][k - 1]) for t in thetas]
    got = chunked(
        m,
        thetas,
        m.check_weights(lam),
        rows,
        base=base,
        params=m.Params(scale=1.2, density=0.3),
        context={"ties_thresholds": {"w": thr}},
        key="w",
    )
    assert rel(got, _ties_reference(thetas, base, lam, 0.3, 1.2)) <= 1e-6


@pytest.mark.parametrize("weights", [[-0.1, 1.0], [0.0, 0.0], [float("nan"), 1.0]])
def test_bad_weights(weights) -> None:
    with pytest.raises(FishmergeError, match="weights"):
        get_method("fisher").check_weights(weights)


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(FishmergeError, match="fisher, isotropic|isotropic, fisher"):
        get_method("slerp")


def test_ties_keeps_floor_of_density_times_n_like_mergekit() -> None:
    """mergekit 0.1.5 keeps int(density·n) entries (`sparsify.magnitude`); fishmerge the same, at least one."""
    assert [kept_entries(d, n) for d, n in [(0.3, 407), (0.2, 10), (0.25, 7), (0.01, 10), (1.0, 9)]] == [
        122,
        2,
        1,
        1,
        9,
    ]
