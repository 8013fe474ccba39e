"""Models by the names users use, in every command: a hub id (`org/name`) resolved offline from a
temporary Hugging Face cache laid out as huggingface_hub writes it, and `models:/Name@alias` from a real
MLflow registry (SQLite) in `fishmerge fisher`, `plan` and `merge` (the pipeline has its own test)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from fishmerge import registry
from fishmerge.flows.cli import main
from fishmerge.io.checkpoint import model_fingerprint
from mlflow import MlflowClient
from safetensors.numpy import load_file

from tests.conftest import save_model_dir, sentences, write_csv

HUB_ID = "acme/tiny-bert"


def place_in_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """The cache layout of huggingface_hub: blobs by hash, a snapshot of links to them, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("model-refs")
    src = save_model_dir(root / "src", "bert-cls", seed=1)
    other = save_model_dir(root / "other", "bert-cls", seed=2)
    cache = root / "hf-cache"
    snapshot = place_in_hub_cache(cache, HUB_ID, src)
    data = write_csv(root / "data.csv", sentences(12, seed=3))
    return {"root": root, "src": src, "other": other, "cache": cache, "snapshot": snapshot, "data": data}


@pytest.fixture
def hf_cache(hub, monkeypatch):
    """Point this process's huggingface_hub at the temporary cache (its constant is read at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    return hub["cache"]


def merge_config(path: Path, first: str, second: str, **extra) -> Path:
    cfg = {
        "name": "refs",
        "method": "isotropic",
        "models": [{"name": "a", "path": first, "weight": 0.5}, {"name": "b", "path": second, "weight": 0.5}],
        "targets": ["a"],
        "output": str(path.parent / "out"),
        **extra,
    }
    path.write_text(json.dumps(cfg))
    return path


def body_average(first: Path, second: Path) -> dict[str, np.ndarray]:
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    return {k: 0.5 * a[k].astype(np.float64) + 0.5 * b[k] for k in a if not k.startswith("classifier.")}


def assert_merged(out: Path, want: dict[str, np.ndarray]) -> None:
    got = load_file(str(out / "a" / "model.safetensors"))
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_hub_id_in_fingerprint_plan_merge_and_fisher(hub, hf_cache, tmp_path, capsys) -> None:
    # a subprocess reads the cache from the environment, as a user's shell gives it
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fishmerge.flows.cli", "fingerprint", HUB_ID],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == model_fingerprint(hub["src"])

    cfg = merge_config(tmp_path / "cfg.yaml", HUB_ID, str(hub["other"]))
    assert main(["plan", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert str(hub["snapshot"]) in out  # the plan names the resolved snapshot folder
    assert main(["merge", str(cfg), "--no-progress"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert_merged(tmp_path / "out", body_average(hub["src"], hub["other"]))
    record = json.loads((tmp_path / "out" / "a" / "fishmerge.json").read_text())
    assert record["inputs"][0]["model_fingerprint"] == model_fingerprint(hub["src"])
    assert sorted(p.name for p in hub["snapshot"].iterdir()) == sorted(p.name for p in hub["src"].iterdir())

    store = tmp_path / "hub.zarr"
    args = ["fisher", "--model", HUB_ID, "--data", str(hub["data"]), "--examples", "8", "--store", str(store)]
    assert main([*args, "--no-progress"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    import zarr

    assert zarr.open_group(str(store), mode="r").attrs["model_fingerprint"] == model_fingerprint(hub["src"])


def test_a_folder_beside_the_config_wins_over_a_hub_id(hub, hf_cache, tmp_path, capsys) -> None:
    local = save_model_dir(tmp_path / "acme" / "tiny-bert", "bert-cls", seed=5)  # same name, relative to the config
    cfg = merge_config(tmp_path / "cfg.yaml", HUB_ID, str(hub["other"]))
    assert main(["plan", str(cfg)]) == 0
    out, _ = capsys.readouterr()
    assert str(local) in out and str(hub["snapshot"]) not in out


def test_a_folder_in_the_working_folder_is_not_taken_for_a_config_hub_id(
    hub, hf_cache, tmp_path, capsys, monkeypatch
) -> None:
    decoy = save_model_dir(tmp_path / "cwd" / "acme" / "tiny-bert", "bert-cls", seed=6)
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "cfgdir").mkdir()
    cfg = merge_config(tmp_path / "cfgdir" / "cfg.yaml", HUB_ID, str(hub["other"]))
    assert main(["plan", str(cfg)]) == 0
    out, _ = capsys.readouterr()
    assert str(hub["snapshot"]) in out and str(decoy) not in out  # the config's relative path never reads the cwd


def test_hub_id_not_in_the_cache_is_one_line_naming_the_cache(hub, hf_cache, tmp_path, capsys) -> None:
    cfg = merge_config(tmp_path / "cfg.yaml", "acme/absent-model", str(hub["other"]))
    for args in (["plan", str(cfg)], ["fisher", "--model", "acme/absent-model", "--data", str(hub["data"])]):
        assert main(args) == 2
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fishmerge: error: model 'acme/absent-model'")
        assert str(hf_cache) in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_registry_uri_in_plan_merge_and_fisher(hub, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # registry downloads go under ./.fishmerge/runs/registry
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry.use_experiment("refs-sources", uri)
    run = MlflowClient().create_run(mlflow.get_experiment_by_name("refs-sources").experiment_id)
    version, _ = registry.register_model_dir(hub["other"], "refs-src", run.info.run_id, "test")
    MlflowClient(uri).set_registered_model_alias("refs-src", "champion", version)

    cfg = merge_config(
        tmp_path / "cfg.yaml", str(hub["src"]), "models:/refs-src@champion", mlflow={"tracking_uri": uri}
    )
    assert main(["plan", str(cfg)]) == 0, capsys.readouterr().err
    out, _ = capsys.readouterr()
    downloads = tmp_path / ".fishmerge" / "runs" / "registry"
    assert str(downloads) in out
    assert main(["merge", str(cfg), "--no-progress"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert_merged(tmp_path / "out", body_average(hub["src"], hub["other"]))

    store = tmp_path / "reg.zarr"
    args = ["fisher", "--model", "models:/refs-src@champion", "--tracking-uri", uri, "--data", str(hub["data"])]
    assert main([*args, "--examples", "8", "--store", str(store), "--no-progress"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    import zarr

    assert zarr.open_group(str(store), mode="r").attrs["model_fingerprint"] == model_fingerprint(hub["other"])
    assert main(["fisher", "--model", "models:/refs-src@nope", "--tracking-uri", uri, "--data", str(hub["data"])]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("fishmerge: error: cannot download models:/refs-src@nope") and len(err.splitlines()) == 1
