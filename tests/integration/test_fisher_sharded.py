"""Sharded estimation: equality with one process, reuse, resume after SIGKILL, corrupt partials,
concurrent runs, store mismatches, inspect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import zarr
from fishmerge.fisher.job import FisherSpec, compute_shard, resolve
from fishmerge.fisher.shards import partials_uri, plan_shards
from fishmerge.fisher.store import read_fisher
from fishmerge.flows.cli import main
from fishmerge.flows.estimate_fisher import run_estimate_fisher
from fishmerge.io import checkpoint

from tests.conftest import save_model_dir, sentences, write_csv


@pytest.fixture(scope="module")
def setup(tmp_path_factory):

    root = tmp_path_factory.mktemp("sharded")
    model = save_model_dir(root / "model", "bert-cls")
    data = write_csv(root / "rows.csv", sentences(40, seed=7))
    spec = FisherSpec(model=str(model), data=str(data), estimator="exact", examples=37, seed=1, batch_size=4)
    single = root / "single.zarr"
    run_estimate_fisher(asdict(spec), store=str(single), shards=1)
    return {"root": root, "spec": spec, "single": read_fisher(str(single)), "model": model, "data": data}


def fisher_args(setup: dict, *extra: str) -> list[str]:
    """`fishmerge fisher` arguments for the module's model and data."""
    return ["fisher", "--no-progress", "--model", str(setup["model"]), "--data", str(setup["data"]), *extra]


def count_loads(monkeypatch) -> list:
    """Model weight loads from here on: the loader wrapped (the real one still loads), each call recorded."""
    from fishmerge.fisher import job

    calls, real = [], checkpoint.load_model

    def counting(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("model_dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_model", counting)
    monkeypatch.setattr(job, "load_model", counting)
    return calls


def rel_err(a: dict, b: dict) -> float:
    num = sum(float(np.linalg.norm(a[k].astype(np.float64) - b[k])) ** 2 for k in b) ** 0.5
    return num / sum(float(np.linalg.norm(b[k].astype(np.float64))) ** 2 for k in b) ** 0.5


@pytest.mark.parametrize("k", [1, 3, 8])
def test_sharded_equals_single_process(setup, tmp_path, k) -> None:
    uri = run_estimate_fisher(asdict(setup["spec"]), store_root=str(tmp_path), shards=k, workers=2)
    assert Path(uri).name.startswith("f") and Path(uri).parent == tmp_path
    got = read_fisher(uri)
    assert set(got) == set(setup["single"])
    assert rel_err(got, setup["single"]) <= 1e-6
    g = zarr.open_group(uri, mode="r")
    assert g.attrs["shards"] == k and g.attrs["n_examples"] == 37
    assert sorted(g.attrs["shards_computed_last_run"]) == list(range(k))
    assert not Path(partials_uri(uri)).exists(), "partials are removed after the reduce"
    assert Path(uri[: -len(".zarr")] + ".layer-mass.png").stat().st_size > 1000
    if k == 3:  # the markdown artifact is on the Prefect server
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        key = f"fisher-{g.attrs['fisher_id']}"
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        assert arts and "Per-layer Fisher mass" in arts[0].data and "examples/s" in arts[0].data


def test_second_request_reuses_without_loading_the_model(setup, tmp_path, capsys, monkeypatch) -> None:
    args = fisher_args(setup, "--examples", "9", "--store-root", str(tmp_path))
    assert main(args) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    loads = count_loads(monkeypatch)
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == first
    assert loads == [], "the model was loaded again"
    assert "reusing" in err
    # A different spec (another seed) is another Fisher.
    assert main([*args, "--seed", "5"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] != first


def test_corrupt_partial_is_recomputed_never_summed(setup, tmp_path) -> None:
    spec = setup["spec"]
    r = resolve(spec, store_root=str(tmp_path))
    plan = plan_shards(len(r.indices), 3)
    for s in plan:
        compute_shard(r, s)
    # Truncate one chunk of shard 1 and delete one chunk of shard 2.
    chunks1 = sorted(p for p in Path(r.partials, "shard-00001").rglob("c/*") if p.is_file())
    chunks1[0].write_bytes(chunks1[0].read_bytes()[:7])
    chunks2 = sorted(p for p in Path(r.partials, "shard-00002").rglob("c/*") if p.is_file())
    chunks2[-1].unlink()
    uri = run_estimate_fisher(asdict(spec), store_root=str(tmp_path), shards=3)
    g = zarr.open_group(uri, mode="r")
    assert sorted(g.attrs["shards_computed_last_run"]) == [1, 2]
    assert rel_err(read_fisher(uri), setup["single"]) <= 1e-6


def _cli(setup, root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fishmerge.flows.cli",
        "fisher",
        "--no-progress",
        "--model",
        str(setup["model"]),
        "--data",
        str(setup["data"]),
        "--estimator",
        "exact",
        "--examples",
        "37",
        "--seed",
        "1",
        "--batch-size",
        "1",
        "--store-root",
        str(root),
        *extra,
    ]


def test_sigkill_then_rerun_computes_only_missing_shards(setup, tmp_path) -> None:
    r = resolve(setup["spec"], store_root=str(tmp_path))
    partials = Path(r.partials)
    proc = subprocess.Popen(_cli(setup, tmp_path, "--shards", "8"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    done: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        done = sorted(partials.glob("shard-*/complete.json"))
        if len(done) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(partials.glob("shard-*/complete.json"))
    before = {p.parent.name: p.read_text() for p in done}
    assert 2 <= len(before) < 8
    again = subprocess.run(_cli(setup, tmp_path, "--shards", "8"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    uri = again.stdout.strip().splitlines()[-1]
    computed = zarr.open_group(uri, mode="r").attrs["shards_computed_last_run"]
    finished = {int(name.split("-")[1]) for name in before}
    assert sorted(computed) == sorted(set(range(8)) - finished)
    assert rel_err(read_fisher(uri), setup["single"]) <= 1e-6


def test_two_concurrent_runs_of_one_spec(setup, tmp_path) -> None:
    procs = [
        subprocess.Popen(
            _cli(setup, tmp_path, "--shards", "4"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    uris = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(uris) == 1
    assert rel_err(read_fisher(uris.pop()), setup["single"]) <= 1e-6


def test_store_of_another_model_or_version_is_a_clear_error(setup, tmp_path, capsys) -> None:
    other = save_model_dir(tmp_path / "other", "bert-cls", seed=3)
    store = tmp_path / "explicit.zarr"
    base = ["fisher", "--no-progress", "--data", str(setup["data"]), "--examples", "5", "--store", str(store)]
    assert main([*base, "--model", str(setup["model"])]) == 0
    capsys.readouterr()
    assert main([*base, "--model", str(other)]) == 2
    assert "another model" in capsys.readouterr().err
    zarr.open_group(str(store), mode="a").attrs["format_version"] = 7
    assert main([*base, "--model", str(setup["model"])]) == 2
    assert "format_version 7" in capsys.readouterr().err


def test_unreachable_store_root(setup, tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(fisher_args(setup, "--store-root", str(blocker / "below")))
    assert code == 2
    assert "unreachable or not writable" in capsys.readouterr().err


def test_inspect_prints_attributes_and_statistics(setup, tmp_path, capsys) -> None:
    uri = run_estimate_fisher(asdict(setup["spec"]), store_root=str(tmp_path), shards=2)
    assert main(["inspect", uri]) == 0
    out = capsys.readouterr().out
    assert "estimator: exact" in out and "n_examples: 37" in out
    assert "classifier.weight" in out and "zeros" in out and "mass" in out
    assert "%" in out


def test_reduce_statistics_match_numpy(setup, tmp_path) -> None:
    """The per-tensor statistics the reduce stores (used by reports and inspect) against numpy."""
    uri = run_estimate_fisher(asdict(setup["spec"]), store_root=str(tmp_path), shards=3)
    stats = zarr.open_group(uri, mode="r").attrs["tensor_stats"]
    fisher = read_fisher(uri)
    assert set(stats) == set(fisher)
    for k, v in fisher.items():
        v64 = v.astype(np.float64)
        assert stats[k]["mass"] == pytest.approx(v64.sum(), rel=1e-6, abs=1e-30)
        assert stats[k]["max"] == pytest.approx(float(v.max()), rel=1e-7, abs=1e-30)
        assert stats[k]["zero_fraction"] == pytest.approx(float((v == 0).mean()))
