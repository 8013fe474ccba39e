"""The estimate-fisher flow on a real local Dask cluster (2 worker processes) and on an
S3-compatible endpoint (moto's server) that the test starts on loopback and stops."""

from __future__ import annotations

import socket
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
from fishmerge.io import checkpoint, storage

from tests.test_fisher_sharded import fisher_args, rel_err, setup  # noqa: F401  (module fixture reused)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = _free_port()
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


def test_flow_on_s3_write_resume_reduce_reuse(setup, s3_endpoint, capsys) -> None:  # noqa: F811
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
    loads = checkpoint.LOAD_COUNT
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
    assert checkpoint.LOAD_COUNT == loads
    assert main(["inspect", uri]) == 0
    assert "n_examples: 37" in capsys.readouterr().out


def test_unreachable_s3_root_is_a_clear_error(setup, s3_endpoint, capsys) -> None:  # noqa: F811
    code = main(fisher_args(setup, "--store-root", "s3://no-such-bucket-here/fishers"))
    assert code == 2
    err = capsys.readouterr().err
    assert "unreachable or not writable" in err and "Traceback" not in err


def test_s3_store_reads_like_a_local_one(setup, s3_endpoint) -> None:  # noqa: F811
    uri = run_estimate_fisher(asdict(setup["spec"]), store_root=s3_endpoint, shards=2)
    g = zarr.open_group(store=storage.zarr_store(uri, read_only=True), mode="r")
    assert g.attrs["format"] == "fishmerge.fisher"
    np.testing.assert_allclose(g["classifier.weight"][...], setup["single"]["classifier.weight"], rtol=1e-5)
