"""A Fisher store written by another tool: plain zarr + numpy + the README's fingerprint recipe, no
fishmerge code, merged by `fishmerge merge`; a store without a fingerprint only with the explicit option."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import zarr
from safetensors.numpy import load_file

from tests.conftest import save_model_dir


def recipe_fingerprint(folder: Path) -> str:
    """The README's recipe, written here from its text: sha256 over (name, dtype, shape) JSON and raw bytes."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    entries = []
    for f in files:
        with open(f, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        entries += [(name, v, f, 8 + size) for name, v in header.items()]
    h = hashlib.sha256()
    for name, v, f, data_start in sorted(entries, key=lambda e: e[0]):
        h.update(json.dumps([name, v["dtype"], v["shape"]]).encode())
        start, end = v["data_offsets"]
        with open(f, "rb") as fh:
            fh.seek(data_start + start)
            h.update(fh.read(end - start))
    return "sha256:" + h.hexdigest()


def checkpoint(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_plain_store(uri: Path, model_dir: Path, seed: int, fingerprint: str | None) -> Path:
    """A v1 store as the README documents it: one float32 array per tensor at its checkpoint key."""
    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(uri), mode="w", zarr_format=3)
    for key, t in checkpoint(model_dir).items():
        f = rng.exponential(size=t.shape).astype(np.float32)
        f.reshape(-1)[::5] = 0.0  # exact zeros: the floor decides there
        group.create_array(key, data=f, compressors=None)
    attrs = {
        "format": "fishmerge.fisher",
        "format_version": 1,
        "estimator": "another-tool",
        "n_examples": 64,
        "data_fingerprint": "sha256:another-tool",
        "created": "2026-12-06T00:00:00+00:00",
        "fishmerge_version": "none",
    }
    if fingerprint is not None:
        attrs["model_fingerprint"] = fingerprint
    group.attrs.update(attrs)
    return uri


def numpy_fisher_merge(thetas, fishers, weights, floor: float) -> dict[str, np.ndarray]:
    """θ* = Σ λᵢ max(Fᵢ, floor) θᵢ / Σ λᵢ max(Fᵢ, floor) over the tensors every model has (fp64)."""
    lam = np.asarray(weights, dtype=np.float64) / sum(weights)
    out = {}
    for key in thetas[0]:
        f = [np.maximum(fi[key].astype(np.float64), floor) for fi in fishers]
        num = sum(w * fi * t[key].astype(np.float64) for w, fi, t in zip(lam, f, thetas))
        out[key] = num / sum(w * fi for w, fi in zip(lam, f))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interop")
    return {"a": save_model_dir(root / "a", "bert-cls", seed=1), "b": save_model_dir(root / "b", "bert-cls", seed=2)}


def config(path: Path, models: dict, stores: dict, **per_model) -> Path:
    entries = [
        {"name": n, "path": str(models[n]), "weight": w, "fisher": str(stores[n]), **per_model.get(n, {})}
        for n, w in (("a", 0.7), ("b", 0.3))
    ]
    cfg = {
        "name": "interop",
        "method": "fisher",
        "models": entries,
        "targets": ["a"],
        "fisher": {"floor": 1.0e-6, "favor_target": False, "normalize": False},
        "output": str(path.parent / "out"),
    }
    path.write_text(json.dumps(cfg))
    return path


def run(args: list[str], capsys) -> tuple[int, str, str]:
    from fishmerge.flows.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_fingerprint_command_prints_the_documented_recipe(models, tmp_path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    code, out, err = run(["fingerprint", str(models["a"])], capsys)
    assert code == 0, err
    assert out.strip() == recipe_fingerprint(models["a"])
    assert recipe_fingerprint(models["a"]) != recipe_fingerprint(models["b"])
    # a sharded checkpoint (index + several files) has the same fingerprint as the single file
    sharded = tmp_path / "sharded"
    AutoModelForSequenceClassification.from_pretrained(models["a"]).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 1
    code, out, err = run(["fingerprint", str(sharded)], capsys)
    assert code == 0, err
    assert out.strip() == recipe_fingerprint(sharded) == recipe_fingerprint(models["a"])


def test_a_store_written_without_fishmerge_merges(models, tmp_path, capsys) -> None:
    stores = {
        n: write_plain_store(tmp_path / f"{n}.zarr", models[n], i, recipe_fingerprint(models[n]))
        for i, n in enumerate(("a", "b"))
    }
    cfg = config(tmp_path / "cfg.yaml", models, stores)
    code, out, err = run(["merge", str(cfg), "--no-progress"], capsys)
    assert code == 0, err
    assert "UNVERIFIED" not in err
    got = checkpoint(tmp_path / "out" / "a")
    thetas = [checkpoint(models[n]) for n in ("a", "b")]
    fishers = [dict(zarr.open_group(str(stores[n]), mode="r").arrays()) for n in ("a", "b")]
    fishers = [{k: v[...] for k, v in f.items()} for f in fishers]
    body = [k for k in thetas[0] if not k.startswith("classifier.")]
    want = numpy_fisher_merge([{k: t[k] for k in body} for t in thetas], fishers, [0.7, 0.3], 1e-6)
    for k in body:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    differ = [k for k in body if not np.array_equal(thetas[0][k], thetas[1][k])]
    assert len(differ) >= 10  # the models differ, so the merge moves those tensors: the check is not vacuous
    assert all(not np.allclose(got[k], thetas[0][k]) for k in differ)
    for k in ("classifier.weight", "classifier.bias"):  # the target keeps its own head
        np.testing.assert_array_equal(got[k], thetas[0][k])


def test_a_store_without_fingerprint_needs_the_explicit_option(models, tmp_path, capsys) -> None:
    stores = {"a": write_plain_store(tmp_path / "a.zarr", models["a"], 0, None)}
    stores["b"] = write_plain_store(tmp_path / "b.zarr", models["b"], 1, recipe_fingerprint(models["b"]))
    refused = config(tmp_path / "refused.yaml", models, stores)
    code, out, err = run(["merge", str(refused), "--no-progress"], capsys)
    assert code == 2
    assert err.startswith("fishmerge: error:") and "records no model_fingerprint" in err
    assert recipe_fingerprint(models["a"]) in err and "fisher_without_fingerprint: true" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()

    accepted = config(tmp_path / "accepted.yaml", models, stores, a={"fisher_without_fingerprint": True})
    code, out, err = run(["plan", str(accepted)], capsys)
    assert code == 0, err
    assert "note: UNVERIFIED: model 'a'" in out and "merge silently into wrong weights" in out
    code, out, err = run(["merge", str(accepted), "--no-progress"], capsys)
    assert code == 0, err
    assert "UNVERIFIED: model 'a'" in err
    got = checkpoint(tmp_path / "out" / "a")
    thetas = [checkpoint(models[n]) for n in ("a", "b")]
    fishers = [{k: v[...] for k, v in zarr.open_group(str(stores[n]), mode="r").arrays()} for n in ("a", "b")]
    body = [k for k in thetas[0] if not k.startswith("classifier.")]
    want = numpy_fisher_merge([{k: t[k] for k in body} for t in thetas], fishers, [0.7, 0.3], 1e-6)
    for k in body:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
