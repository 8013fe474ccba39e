"""Grams through the estimation flow: added to an existing Fisher store without recomputing the
Fisher, reused by content address, shown by `fishmerge inspect`, and merged by regmean."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from fishmerge.fisher import job
from fishmerge.fisher.job import FisherSpec, resolve
from fishmerge.fisher.store import read_fisher, read_grams, stored_attributes
from fishmerge.flows.cli import main
from fishmerge.flows.estimate_fisher import run_estimate_fisher

from tests.conftest import save_model_dir, sentences, write_csv


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grams")
    models = [save_model_dir(root / f"model{s}", "bert-cls", seed=s) for s in (0, 1)]
    data = write_csv(root / "rows.csv", sentences(60, seed=3))
    spec = FisherSpec(model=str(models[0]), data=str(data), estimator="empirical", examples=50, seed=2, batch_size=8)
    return {"root": root, "models": models, "data": data, "spec": spec}


def spy_statistics(monkeypatch) -> list:
    """The statistics each FisherAccumulator is built with from here on (the real one still runs)."""
    seen, real = [], job.FisherAccumulator

    def recording(*args, **kwargs):
        seen.append(list(kwargs.get("statistics", ["fisher"])))
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "FisherAccumulator", recording)
    return seen


def test_grams_are_added_to_a_fisher_store_without_recomputing_the_fisher(setup, tmp_path, monkeypatch) -> None:
    store = tmp_path / "s.zarr"
    run_estimate_fisher(asdict(setup["spec"]), store=str(store), shards=2)
    before = read_fisher(str(store))
    chunks = {p.relative_to(store): p.read_bytes() for p in store.rglob("c/*") if p.is_file()}
    assert stored_attributes(str(store))["format_version"] == 1
    from fishmerge.merge.inputs import fisher_reader

    assert "grams" not in fisher_reader(str(store)).group.attrs  # opened (and kept) by this process
    seen = spy_statistics(monkeypatch)
    both = replace(setup["spec"], statistics=["fisher", "gram"])
    run_estimate_fisher(asdict(both), store=str(store), shards=2)
    assert seen == [["gram"], ["gram"]], "only the Grams were computed, shard by shard"
    attrs = stored_attributes(str(store))
    assert attrs["format_version"] == 2 and attrs["statistics"] == ["fisher", "gram"]
    assert attrs["statistics_computed_last_run"] == ["gram"]
    assert "grams" in fisher_reader(str(store)).group.attrs  # the replaced store is opened again
    after = read_fisher(str(store))
    assert all(after[k].tobytes() == v.tobytes() for k, v in before.items()) and set(after) == set(before)
    for rel, data in chunks.items():  # the Fisher's chunks are copied byte for byte
        assert (store / rel).read_bytes() == data
    # the Grams equal those of one pass computing both from scratch
    fresh = run_estimate_fisher(asdict(both), store=str(tmp_path / "fresh.zarr"), shards=1)
    want, got = read_grams(fresh), read_grams(str(store))
    assert set(got) == set(want) and len(got) >= 12
    for k, (g, tokens, layout) in got.items():
        assert tokens == want[k][1] and layout == want[k][2] == "out_in"
        np.testing.assert_allclose(g, want[k][0], rtol=1e-5, atol=1e-5 * float(np.abs(want[k][0]).max()))
    # asked again: reused as it is, nothing computed
    seen.clear()
    assert run_estimate_fisher(asdict(both), store=str(store)) == str(store) and seen == []
    # a Fisher-only request is served by the store holding more
    assert run_estimate_fisher(asdict(setup["spec"]), store=str(store)) == str(store) and seen == []


def test_grams_alone_asked_at_a_fisher_store_keep_its_fishers(setup, tmp_path, monkeypatch) -> None:
    store = tmp_path / "s.zarr"
    run_estimate_fisher(asdict(setup["spec"]), store=str(store))
    before = read_fisher(str(store))
    seen = spy_statistics(monkeypatch)
    gram_only = replace(setup["spec"], statistics=["gram"])
    r = resolve(gram_only, str(store))
    assert r.spec.statistics == ["fisher", "gram"] and r.donor == str(store) and r.compute == ["gram"]
    run_estimate_fisher(asdict(gram_only), store=str(store))
    assert seen == [["gram"]]
    assert stored_attributes(str(store))["statistics"] == ["fisher", "gram"]
    after = read_fisher(str(store))
    assert set(after) == set(before) and all(np.array_equal(after[k], v) for k, v in before.items())


def test_content_addressed_grams_reuse_the_fisher_store_beside_them(setup, tmp_path, monkeypatch) -> None:
    root = str(tmp_path / "stores")
    fisher_only = run_estimate_fisher(asdict(setup["spec"]), store_root=root)
    both = replace(setup["spec"], statistics=["gram", "fisher"])
    r = resolve(both, None, root)
    assert r.donor == fisher_only and r.compute == ["gram"] and r.fisher_id != r.estimation_id
    seen = spy_statistics(monkeypatch)
    uri = run_estimate_fisher(asdict(both), store_root=root)
    assert seen == [["gram"]] and Path(uri).name == f"{r.fisher_id}.zarr"
    assert read_fisher(uri).keys() == read_fisher(fisher_only).keys()
    seen.clear()  # Grams alone are served by the store holding both
    assert run_estimate_fisher(asdict(replace(setup["spec"], statistics=["gram"])), store_root=root) == uri
    assert seen == []


def test_cli_statistics_flag_inspect_and_a_regmean_merge(setup, tmp_path, capsys) -> None:
    stores = []
    for i, model in enumerate(setup["models"]):
        store = str(tmp_path / f"g{i}.zarr")
        args = ["fisher", "--no-progress", "--model", str(model), "--data", str(setup["data"])]
        assert main([*args, "--statistics", "gram", "--examples", "50", "--store", store]) == 0
        stores.append(store)
    capsys.readouterr()
    assert main(["inspect", stores[0]]) == 0
    out = capsys.readouterr().out
    assert "statistics: ['gram']" in out and "Grams: 10 stored for 14 weights" in out
    assert "query.weight (+2)" in out and "mass" not in out  # no Fisher table in a Gram-only store
    g = zarr.open_group(stores[0], mode="r")
    assert list(g.array_keys()) == [] and "bert.pooler.dense.weight" in g.attrs["grams"]
    cfg = {
        "name": "rm",
        "method": "regmean",
        "models": [
            {"name": f"m{i}", "path": str(m), "fisher": s} for i, (m, s) in enumerate(zip(setup["models"], stores))
        ],
        "output": str(tmp_path / "out"),
        "regmean": {"alpha": 0.9},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(tmp_path / "c.yaml")]) == 0
    plan_text = capsys.readouterr().out
    assert "method regmean" in plan_text and "alpha=0.9 rest=isotropic" in plan_text
    assert main(["merge", "--no-progress", str(tmp_path / "c.yaml")]) == 0
    assert (tmp_path / "out" / "m0" / "model.safetensors").exists()


def test_a_donor_replaced_while_it_is_copied_fails_cleanly(setup, tmp_path, monkeypatch) -> None:
    import os

    from fishmerge.errors import FishmergeError
    from fishmerge.fisher import reduce

    store = tmp_path / "s.zarr"
    run_estimate_fisher(asdict(setup["spec"]), store=str(store))
    meta = store / "zarr.json"
    real = reduce._copy_block

    def copy_then_replace(*args):  # another run swaps the donor in the middle of the copy
        out = real(*args)
        meta.write_bytes(meta.read_bytes())
        os.utime(meta, ns=(1, 1))
        return out

    monkeypatch.setattr(reduce, "_copy_block", copy_then_replace)
    r = resolve(replace(setup["spec"], statistics=["fisher", "gram"]), str(store))
    from fishmerge.fisher.job import compute_shard, finish
    from fishmerge.fisher.shards import plan_shards

    plan = plan_shards(len(r.indices), 1)
    summaries = [compute_shard(r, plan[0])]
    with pytest.raises(FishmergeError, match="was replaced or removed while its arrays were copied: rerun"):
        finish(r, plan, summaries, 1.0)
    assert stored_attributes(str(store))["statistics"] == ["fisher"]  # the donor stands as it was
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.zarr.tmp")]
