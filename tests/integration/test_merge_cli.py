"""`fishmerge plan` / `fishmerge merge` end to end: the flow, its artifact, SIGKILL and resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from fishmerge.fisher.store import write_fisher_store
from fishmerge.flows.cli import main
from fishmerge.io.checkpoint import cached_model_fingerprint
from fishmerge.io.safetensors import tensor_index

from tests.conftest import save_model_dir

REPO = Path(__file__).resolve().parents[2]


def write_fisher(model_dir: Path, seed: int, nan_key: str | None = None) -> Path:
    """A real v1 store for this model (random positive values, some exact zeros)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, ref in tensor_index(model_dir).items():
        f = rng.exponential(size=ref.shape).astype(np.float32)
        f.reshape(-1)[::7] = 0.0
        tensors[key] = f
    uri = Path(f"{model_dir}.fisher.zarr")
    attrs = {
        "estimator": "synthetic",
        "n_examples": 1,
        "model_fingerprint": cached_model_fingerprint(model_dir),
        "data_fingerprint": "synthetic",
    }
    write_fisher_store(str(uri), tensors, attrs)
    if nan_key:  # the writer refuses NaN: corrupt the stored values afterwards, as a bad disk would
        arr = zarr.open_group(str(uri), mode="r+")[nan_key]
        values = arr[...]
        values.reshape(-1)[0] = np.nan
        arr[...] = values
    return uri


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-inputs")
    a = save_model_dir(root / "a", "bert-cls", seed=1)
    b = save_model_dir(root / "b", "bert-cls2", seed=2)
    other = save_model_dir(root / "gpt2", "gpt2-cls", seed=3)
    return {"root": root, "a": a, "b": b, "gpt2": other, "fa": write_fisher(a, 1), "fb": write_fisher(b, 2)}


def write_config(path: Path, models: list[dict], **extra) -> Path:
    cfg = {"name": "t", "method": "fisher", "models": models, "output": str(path.parent / "out"), **extra}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def two_models(inputs, fb=None) -> list[dict]:
    return [
        {"name": "a", "path": str(inputs["a"]), "weight": 0.6, "fisher": str(inputs["fa"])},
        {"name": "b", "path": str(inputs["b"]), "weight": 0.4, "fisher": str(fb or inputs["fb"])},
    ]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fishmerge.flows.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def weights_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_plan_then_merge_with_artifact(inputs, tmp_path, capsys) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", two_models(inputs), targets=["a", "b"])
    code, out, err = run(["plan", str(cfg)], capsys)
    assert code == 0, err
    assert "merged tensors: 39" in out and "target a: 2 own tensor(s)" in out and "estimated peak" in out
    assert not (tmp_path / "out").exists()  # plan does no work

    code, out, err = run(["merge", str(cfg), "--no-progress"], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "out")
    for t in ("a", "b"):
        files = {p.name for p in (tmp_path / "out" / t).iterdir()}
        assert {"model.safetensors", "config.json", "fishmerge.json", "README.md", "tokenizer_config.json"} <= files
        record = json.loads((tmp_path / "out" / t / "fishmerge.json").read_text())
        assert record["method"] == "fisher" and [i["weight"] for i in record["inputs"]] == [0.6, 0.4]
        assert record["inputs"][0]["model_fingerprint"] == cached_model_fingerprint(inputs["a"])

    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    plan_id = record["plan_id"]

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"merge-{plan_id}"]))
            )

    found = asyncio.run(artifacts())
    assert found and "## Outputs" in found[0].data and str(tmp_path / "out" / "a") in found[0].data


def test_sigkill_midway_then_resume_equals_uninterrupted(inputs, tmp_path) -> None:
    (tmp_path / "ref").mkdir()
    ref_cfg = write_config(tmp_path / "ref" / "cfg.yaml", two_models(inputs), targets=["a", "b"], memory_limit="451MiB")
    assert cli(["merge", str(ref_cfg), "--threads", "1", "--no-progress"]).returncode == 0
    reference = weights_bytes(tmp_path / "ref" / "out")

    (tmp_path / "run").mkdir()
    cfg = write_config(tmp_path / "run" / "cfg.yaml", two_models(inputs), targets=["a", "b"], memory_limit="451MiB")
    # SIGKILL at the 31st file-system commit step (tests/integration/killpoint.py): midway through the blocks
    killed = subprocess.run(
        [sys.executable, "-m", "tests.integration.killpoint", "--at", "31", "--", "merge", str(cfg)]
        + ["--threads", "1", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no cleanup code ran
    out = tmp_path / "run" / "out"
    assert not out.exists()  # never a partial output folder
    staging = [p for p in out.parent.iterdir() if p.name.startswith(".out.staging-")]
    assert len(staging) == 1
    journaled = (staging[0] / "journal.tsv").read_text().splitlines()
    assert len(journaled) >= 8

    # Resume with another block size (memory limit): journaled ranges are skipped, the rest computed.
    cfg = write_config(tmp_path / "run" / "cfg.yaml", two_models(inputs), targets=["a", "b"], memory_limit="2GB")
    done = cli(["merge", str(cfg), "--no-progress"])
    assert done.returncode == 0, done.stderr
    assert f"{len(journaled)} block(s) resumed" in done.stderr
    assert weights_bytes(out) == reference
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.staging-")]


def expect_error(args: list[str], capsys, *words: str) -> str:
    code, out, err = run(args, capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


def test_bad_input_errors(inputs, tmp_path, capsys) -> None:
    root = inputs["root"]
    # Shapes: a wider model; every mismatched tensor is listed at once.
    import transformers as tf

    from tests.tiny_models import _bert_cfg

    wide = root / "wide"
    if not wide.exists():
        config = _bert_cfg(num_labels=3)
        config.hidden_size = 40
        tf.BertForSequenceClassification(config).save_pretrained(wide)
    cfg = write_config(
        tmp_path / "c1.yaml",
        [two_models(inputs)[0], {"name": "w", "path": str(wide), "weight": 0.5}],
        method="isotropic",
    )
    err = expect_error(
        ["plan", str(cfg)],
        capsys,
        "differ in shape",
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.1.output.dense.weight",
    )
    assert err.count("\n    ") >= 20  # one line per mismatched tensor

    cfg = write_config(
        tmp_path / "c2.yaml",
        [two_models(inputs)[0], {"name": "g", "path": str(inputs["gpt2"]), "weight": 0.5}],
        method="isotropic",
    )
    expect_error(["plan", str(cfg)], capsys, "architectures differ", "bert", "gpt2")

    cfg = write_config(tmp_path / "c3.yaml", two_models(inputs), method="ties")
    expect_error(["plan", str(cfg)], capsys, "needs `base:`")

    models = two_models(inputs)
    models[0]["weight"], models[1]["weight"] = 0.0, 0.0
    expect_error(["plan", str(write_config(tmp_path / "c4.yaml", models))], capsys, "sum to 0")
    models[0]["weight"] = -1.0
    expect_error(["plan", str(write_config(tmp_path / "c5.yaml", models))], capsys, "weight must be ≥ 0")

    cfg = write_config(tmp_path / "c6.yaml", two_models(inputs, fb=inputs["fa"]))
    expect_error(["plan", str(cfg)], capsys, "computed for another model", "model 'b'")

    models = two_models(inputs)
    models[1]["path"] = str(root / "missing")
    expect_error(["plan", str(write_config(tmp_path / "c7.yaml", models))], capsys, "does not exist")

    cfg = write_config(tmp_path / "c8.yaml", two_models(inputs), memory_limit="1MB")
    expect_error(["plan", str(cfg)], capsys, "memory_limit", "too small")

    cfg = write_config(tmp_path / "c9.yaml", two_models(inputs), mehtod="fisher")
    expect_error(["plan", str(cfg)], capsys, "did you mean 'method'")

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    cfg = write_config(tmp_path / "c10.yaml", two_models(inputs))
    for extra in ([], ["--overwrite"]):  # not fishmerge's: never replaced, and --overwrite is not suggested
        err = expect_error(["merge", str(cfg), "--no-progress", *extra], capsys, "not a fishmerge output")
        assert "--overwrite" not in err
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's own file"
    (tmp_path / "out" / "notes.txt").unlink()  # an empty folder holds nothing to lose: it is used
    code, out, err = run(["merge", str(cfg), "--no-progress"], capsys)
    assert code == 0, err
    other = write_config(tmp_path / "c11.yaml", [{**m, "weight": 0.5} for m in two_models(inputs)])
    expect_error(["merge", str(other), "--no-progress"], capsys, "another fishmerge merge", "--overwrite")
    code, out, err = run(["merge", str(other), "--no-progress", "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "a" / "fishmerge.json").read_text())["inputs"][0]["weight"] == 0.5


def test_nan_fisher_values_fail_the_merge_and_leave_nothing(inputs, tmp_path, capsys) -> None:
    bad_model = save_model_dir(tmp_path / "bn", "bert-cls2", seed=2)
    store = write_fisher(bad_model, 5, nan_key="bert.encoder.layer.0.attention.self.query.weight")
    models = two_models(inputs, fb=store)
    models[1]["path"] = str(bad_model)
    cfg = write_config(tmp_path / "cfg.yaml", models)
    expect_error(
        ["merge", str(cfg), "--no-progress"],
        capsys,
        "NaN/Inf",
        "bert.encoder.layer.0.attention.self.query.weight",
        "model 'b'",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn", "bn.fisher.zarr", "cfg.yaml"]  # no output, no staging


def test_nan_in_store_statistics_is_caught_by_the_plan(inputs, tmp_path, capsys) -> None:
    bad_model = save_model_dir(tmp_path / "bs", "bert-cls2", seed=2)
    store = write_fisher(bad_model, 6)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["tensor_stats"] = {"bert.pooler.dense.bias": {"mass": float("nan"), "max": 1.0, "zero_fraction": 0.0}}
    models = two_models(inputs, fb=store)
    models[1]["path"] = str(bad_model)
    expect_error(
        ["plan", str(write_config(tmp_path / "cfg.yaml", models))], capsys, "NaN/Inf", "bert.pooler.dense.bias"
    )
