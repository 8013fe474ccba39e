"""The estimate-fisher flow on a real local Dask cluster (2 worker processes) and on an
S3-compatible endpoint (moto's server) that the test starts on loopback and stops."""

from __future__ import annotations

import uuid
from dataclasses import asdict

import numpy as np
import pytest
import zarr
from fishmerge.fisher.job import compute_shard, resolve
from fishmerge.fisher.shards import plan_shards
from fishmerge.fisher.store import open_fisher_store, read_fisher
from fishmerge.flows.cli import main
from fishmerge.flows.estimate_fisher import run_estimate_fisher
from fishmerge.io import storage

from tests.integration.stack import free_ports
from tests.integration.test_fisher_sharded import count_loads, fisher_args, rel_err, setup  # noqa: F401  (module fixture reused)


def test_flow_on_a_local_dask_cluster_with_two_worker_processes(setup, tmp_path) -> None:  # noqa: F811
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        uri = run_estimate_fisher(
            asdict(setup["spec"]), store_root=str(tmp_path), shards=4, dask_address=cluster.scheduler_address
        )
        with Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
    assert rel_err(read_fisher(uri), setup["single"]) <= 1e-6
    assert sorted(zarr.open_group(uri, mode="r").attrs["shards_computed_last_run"]) == [0, 1, 2, 3]


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fishmerge-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fishmerge-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FISHMERGE_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    import fsspec

    bucket = f"fishers-{uuid.uuid4().hex[:8]}"  # moto keeps buckets across server restarts in a process
    fsspec.filesystem("s3", skip_instance_cache=True, **storage.storage_options("s3://x")).mkdir(bucket)
    try:
        yield f"s3://{bucket}/fishers"
    finally:
        server.stop()


def test_flow_on_s3_write_resume_reduce_reuse(setup, s3_endpoint, capsys, monkeypatch) -> None:  # noqa: F811
    spec = setup["spec"]
    r = resolve(spec, store_root=s3_endpoint)
    assert r.store.startswith(s3_endpoint + "/f")
    compute_shard(r, plan_shards(len(r.indices), 3)[0])  # a run that died after one shard
    uri = run_estimate_fisher(asdict(spec), store_root=s3_endpoint, shards=3)
    assert uri == r.store
    attrs = dict(open_fisher_store(uri).attrs)
    assert sorted(attrs["shards_computed_last_run"]) == [1, 2]
    assert rel_err(read_fisher(uri), setup["single"]) <= 1e-6
    assert not storage.exists(r.partials)
    assert storage.exists(uri.removesuffix(".zarr") + ".layer-mass.png")
    loads = count_loads(monkeypatch)
    args = [
        "fisher",
        "--no-progress",
        "--model",
        spec.model,
        "--data",
        spec.data,
        "--estimator",
        "exact",
        "--examples",
        "37",
        "--seed",
        "1",
        "--store-root",
        s3_endpoint,
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == uri
    assert loads == []
    assert main(["inspect", uri]) == 0
    assert "n_examples: 37" in capsys.readouterr().out


def test_unreachable_s3_root_is_a_clear_error(setup, s3_endpoint, capsys) -> None:  # noqa: F811
    code = main(fisher_args(setup, "--store-root", "s3://no-such-bucket-here/fishers"))
    assert code == 2
    err = capsys.readouterr().err
    assert "unreachable or not writable" in err and "Traceback" not in err


def _finished_on_s3(setup, root: str):  # noqa: F811
    """A store on S3 finished by one run, its partials kept for a second reduce of the same spec."""
    from fishmerge.fisher.job import finish
    from fishmerge.fisher.shards import complete_shards

    r = resolve(setup["spec"], store_root=root)
    plan = plan_shards(len(r.indices), 2)
    summaries = [compute_shard(r, s) for s in plan]
    assert finish(r, plan, summaries, 1.0, keep_partials=True) == r.store
    markers = complete_shards(r.partials, r.fisher_id, plan)
    attrs = {k: v for k, v in open_fisher_store(r.store).attrs.items() if k not in ("n_examples", "tensor_stats")}
    fs, path = storage.filesystem(r.store)
    return r, plan, markers, attrs, fs, path


def _leftovers(fs, root: str) -> list[str]:
    return [p for p in fs.find(storage.filesystem(root)[1]) if ".tmp-" in p]


def test_a_second_reduce_of_a_finished_s3_store_keeps_it_and_a_failed_one_never_deletes_it(
    setup,  # noqa: F811
    s3_endpoint,
) -> None:
    """Two runs of one spec that both passed their reuse check: the later reduce leaves the finished
    store as it is (objects and metadata), and a later reduce that fails removes only its own staging."""
    from fishmerge.fisher.reduce import CorruptPartials, reduce_partials

    r, plan, markers, attrs, fs, path = _finished_on_s3(setup, s3_endpoint)
    meta = fs.cat_file(f"{path}/zarr.json")
    objects = sorted(fs.find(path))
    before = read_fisher(r.store)
    assert reduce_partials(r.partials, plan, markers, r.store, {**attrs, "wall_time_s": 99.0}) == r.store
    fs.invalidate_cache()
    assert fs.cat_file(f"{path}/zarr.json") == meta, "a finished store was rewritten"
    assert sorted(fs.find(path)) == objects
    assert not _leftovers(fs, s3_endpoint)

    chunk = sorted(p for p in fs.find(storage.filesystem(r.partials)[1]) if "shard-00001" in p and "/c/" in p)[0]
    fs.pipe_file(chunk, fs.cat_file(chunk)[:5])
    with pytest.raises(CorruptPartials):
        reduce_partials(r.partials, plan, markers, r.store, attrs)
    got = read_fisher(r.store)  # the first run's store is still there, whole
    assert set(got) == set(before) and all(np.array_equal(got[k], before[k]) for k in before)
    assert not _leftovers(fs, s3_endpoint), "staging objects left behind"


def test_an_unfinished_s3_store_is_replaced_whole(setup, s3_endpoint) -> None:  # noqa: F811
    """A store a killed run left half-copied (marked `writing`, a stray array) is replaced by the next run."""
    spec = setup["spec"]
    r = resolve(spec, store_root=s3_endpoint)
    fs, path = storage.filesystem(r.store)
    fs.pipe_file(
        f"{path}/zarr.json",
        b'{"zarr_format": 3, "node_type": "group", "attributes": '
        b'{"format": "fishmerge.fisher", "format_state": "writing"}}',
    )
    fs.pipe_file(f"{path}/stray.weight/zarr.json", b"{}")
    uri = run_estimate_fisher(asdict(spec), store_root=s3_endpoint, shards=2)
    assert uri == r.store
    fs.invalidate_cache()
    assert not fs.exists(f"{path}/stray.weight/zarr.json")
    assert rel_err(read_fisher(uri), setup["single"]) <= 1e-6
    g = zarr.open_group(store=storage.zarr_store(uri, read_only=True), mode="r")  # reads like a local store
    assert g.attrs["format"] == "fishmerge.fisher"
    np.testing.assert_allclose(g["classifier.weight"][...], setup["single"]["classifier.weight"], rtol=1e-5)
    assert not _leftovers(fs, s3_endpoint)


def test_grams_complete_an_explicit_s3_store_in_place(setup, s3_endpoint, monkeypatch) -> None:  # noqa: F811
    from dataclasses import replace

    from fishmerge.fisher import job
    from fishmerge.fisher.store import read_grams

    store = s3_endpoint + "/explicit.zarr"
    run_estimate_fisher(asdict(setup["spec"]), store=store)
    before = read_fisher(store)
    seen, real = [], job.FisherAccumulator
    monkeypatch.setattr(job, "FisherAccumulator", lambda *a, **k: seen.append(k["statistics"]) or real(*a, **k))
    both = replace(setup["spec"], statistics=["fisher", "gram"])
    assert run_estimate_fisher(asdict(both), store=store) == storage.normalize(store)
    assert seen == [["gram"]]
    attrs = dict(open_fisher_store(store).attrs)
    assert attrs["format_version"] == 2 and attrs["statistics"] == ["fisher", "gram"]
    after = read_fisher(store)
    assert set(after) == set(before) and all(np.array_equal(after[k], v) for k, v in before.items())
    assert len(read_grams(store)) >= 12
