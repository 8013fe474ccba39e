"""`fishmerge run` comparing every merge method asked for (evaluate.baselines) side by side.

TIES merges (its density × scale searched with λᵢ = 1), task arithmetic (scale searched), isotropic and
RegMean are compared, each with its own validation search, on the two tiny keyword BERTs of
test_pipeline. Oracles: numpy task arithmetic and TIES (own trim, sign election, disjoint mean) scored by
hand; the out-of-core TIES output against the numpy TIES of the chosen parameters. Real Prefect,
MLflow, Zarr.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fishmerge.flows.pipeline import run_pipeline
from fishmerge.merge.methods.task_arithmetic import SEARCHED_SCALES
from fishmerge.merge.methods.ties import SEARCHED_DENSITIES
from fishmerge.merge.methods.ties import SEARCHED_SCALES as TIES_SCALES
from mlflow import MlflowClient
from safetensors.numpy import load_file

from tests.conftest import save_model_dir
from tests.integration.test_pipeline import KEYWORDS, SEARCH_LIMIT, accuracy_by_hand, write_config
from tests.integration.test_pipeline import ws as ws  # noqa: F401  (the module's workspace fixture)

BASELINES = ["originals", "isotropic", "task_arithmetic", "regmean", "ensemble"]


def numpy_task_arithmetic(base: dict, thetas: list[dict], keys: list[str], scale: float) -> dict:
    return {k: base[k] + scale * sum(t[k] - base[k] for t in thetas) for k in keys}


def numpy_ties(base: dict, thetas: list[dict], keys: list[str], density: float, scale: float) -> dict:
    """TIES with λᵢ = 1: keep each task vector's ⌊density·n⌋ (≥ 1) largest magnitudes, elect the sign of
    the sum, average the entries agreeing with it."""
    out = {}
    for k in keys:
        tvs = []
        for t in thetas:
            tv = t[k] - base[k]
            keep = max(1, int(np.floor(density * tv.size)))
            thr = np.sort(np.abs(tv).ravel())[-keep]
            tvs.append(np.where(np.abs(tv) >= thr, tv, 0.0))
        sign = np.sign(sum(tvs))
        agree = [(np.sign(tv) == sign) & (tv != 0) for tv in tvs]
        num = sum(np.where(a, tv, 0.0) for a, tv in zip(agree, tvs))
        den = sum(a.astype(np.float64) for a in agree)
        out[k] = base[k] + scale * np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return out


def scored(ws: Path, state: dict, split: str, limit: int) -> dict[str, float]:
    """Accuracy by hand of the shared tensors `state` under each target's own head."""
    tensors = {k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}
    return {t: accuracy_by_hand(ws / t, tensors, ws / f"data-{t}", split, limit) for t in KEYWORDS}


@pytest.fixture(scope="module")
def compared(ws):  # noqa: F811
    base = save_model_dir(ws / "base", "bert-cls2", seed=0)  # the body both models were fine-tuned from
    uri = f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"
    path = write_config(ws, "p-methods.yaml", uri, output="out-methods", register="fm-methods", baselines=BASELINES)
    cfg = json.loads(path.read_text())
    # α < 1: the tiny keyword data spans too few directions for RegMean's plain Gram systems
    cfg.update(method="ties", base=str(base), regmean={"alpha": 0.5})
    path.write_text(json.dumps(cfg))
    result = run_pipeline(str(path))
    summary = json.loads((ws / "out-methods" / "pipeline.json").read_text())
    thetas = [
        {k: v.astype(np.float64) for k, v in load_file(str(ws / n / "model.safetensors")).items()} for n in KEYWORDS
    ]
    base_t = {k: v.astype(np.float64) for k, v in load_file(str(base / "model.safetensors")).items()}
    keys = [k for k in thetas[0] if k.startswith("bert.")]
    return {"uri": uri, "result": result, "summary": summary, "thetas": thetas, "base": base_t, "keys": keys}


def test_each_method_is_reported_in_the_order_asked(compared) -> None:
    result, summary = compared["result"], compared["summary"]
    assert list(result["results"]) == ["merged", *BASELINES]
    assert set(summary["searches"]) == {"ties", "isotropic", "task_arithmetic", "regmean"}
    report = Path(result["report"]).read_text()
    side = report.split("## Methods side by side", 1)[1].split("## Results", 1)[0]
    for label in ["merged (ties)", *BASELINES]:
        assert f"| {label}" in side or f"| **{label}**" in side, label
    metrics = MlflowClient(compared["uri"]).get_run(result["run_id"]).data.metrics
    for kind in BASELINES:
        for t in KEYWORDS:
            assert metrics[f"{kind}/{t}/accuracy"] == result["results"][kind][f"{t}/accuracy"]


def test_task_arithmetic_searches_its_scale_against_numpy(ws, compared) -> None:  # noqa: F811
    search = compared["summary"]["searches"]["task_arithmetic"]
    cands = search["candidates"]
    assert [c["params"]["scale"] for c in cands] == list(SEARCHED_SCALES)
    assert all(c["weights"] == [1.0, 1.0] for c in cands)
    thetas, base, keys = compared["thetas"], compared["base"], compared["keys"]
    for c in cands:
        by_hand = scored(
            ws, numpy_task_arithmetic(base, thetas, keys, c["params"]["scale"]), "validation", SEARCH_LIMIT
        )
        assert c["per_task"] == pytest.approx(by_hand, abs=1e-12), c["params"]
    best = cands[search["best"]]
    test = scored(ws, numpy_task_arithmetic(base, thetas, keys, best["params"]["scale"]), "test", 10**6)
    got = {t: compared["result"]["results"]["task_arithmetic"][f"{t}/accuracy"] for t in KEYWORDS}
    assert got == pytest.approx(test, abs=1e-12)


def test_ties_searches_density_and_scale_and_merges_the_choice_out_of_core(ws, compared) -> None:  # noqa: F811
    search = compared["summary"]["searches"]["ties"]
    cands = search["candidates"]
    grid = [(d, s) for d in SEARCHED_DENSITIES for s in TIES_SCALES]
    assert [(c["params"]["density"], c["params"]["scale"]) for c in cands] == grid
    thetas, base, keys = compared["thetas"], compared["base"], compared["keys"]
    scores = []
    for c in cands:  # each density trims by its own thresholds (the pre-pass per parameter value)
        by_hand = scored(
            ws, numpy_ties(base, thetas, keys, c["params"]["density"], c["params"]["scale"]), "validation", SEARCH_LIMIT
        )
        assert c["per_task"] == pytest.approx(by_hand, abs=1e-12), c["params"]
        scores.append(np.mean(list(by_hand.values())))
    assert len(set(scores)) > 1, f"every TIES candidate scores {scores}: the test is weak"
    best = cands[search["best"]]["params"]
    want = numpy_ties(base, thetas, keys, best["density"], best["scale"])
    for folder in compared["result"]["targets"].values():
        written = load_file(str(Path(folder) / "model.safetensors"))
        for k in keys:
            np.testing.assert_allclose(written[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        lineage = json.loads((Path(folder) / "fishmerge.json").read_text())
        assert json.dumps(lineage).count(f"{best['density']}") >= 1  # the chosen density is recorded
