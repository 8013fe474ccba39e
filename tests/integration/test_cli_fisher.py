"""`fishmerge fisher` end to end on tiny saved models: store contract, oracle agreement, data formats."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import numpy as np
import torch
import zarr
from fishmerge.fisher.store import REQUIRED_ATTRS
from fishmerge.flows.cli import main
from fishmerge.io.checkpoint import checkpoint_keys
from fishmerge.io.data import select_indices
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import sentences
from tests.oracle import naive_fisher


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["fisher", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_store_contract_and_oracle(model_dirs, csv_data, tmp_path, capsys) -> None:
    model_dir = model_dirs["bert-cls"]
    store = tmp_path / "f.zarr"
    code, out, err = run_cli(
        [
            "--model",
            str(model_dir),
            "--data",
            str(csv_data),
            "--estimator",
            "exact",
            "--examples",
            "11",
            "--seed",
            "3",
            "--batch-size",
            "4",
            "--max-length",
            "8",
            "--store",
            str(store),
        ],
        capsys,
    )
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(store.absolute())
    group = zarr.open_group(str(store), mode="r")
    keys = checkpoint_keys(model_dir)
    assert set(group.array_keys()) == set(keys)
    for k, (_, shape) in keys.items():
        assert group[k].shape == tuple(shape) and group[k].dtype == np.float32
    attrs = dict(group.attrs)
    assert all(a in attrs for a in REQUIRED_ATTRS)
    assert attrs["format"] == "fishmerge.fisher" and attrs["format_version"] == 1
    assert attrs["n_examples"] == 11 and attrs["estimator"] == "exact"

    # Same Fisher from the naive oracle on the same rows, each tokenized alone (no padding).
    rows = list(datasets.load_dataset("csv", data_files=str(csv_data), split="train"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    picked = select_indices(len(rows), 11, 3)
    examples = [
        {
            "id": i,
            "input_ids": tok(rows[i]["text"], truncation=True, max_length=8)["input_ids"],
            "label": rows[i]["label"],
        }
        for i in picked
    ]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    ref = naive_fisher(model, examples, "exact", "sequence_classification", seed=3)
    for k, v in ref.items():
        got = torch.from_numpy(group[k][...]).double()
        assert float((got - v.double()).norm()) <= 1e-5 * float(v.double().norm()) + 1e-12, k


def _write(fmt: str, rows: list[dict], tmp_path):
    ds = datasets.Dataset.from_list(rows)
    if fmt == "csv":
        path = tmp_path / "d.csv"
        ds.to_csv(str(path))
    elif fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "d"
        datasets.DatasetDict({"train": ds.select(range(2)), "validation": ds}).save_to_disk(str(path))
    return path


def test_data_formats_give_the_same_fisher(model_dirs, tmp_path, capsys) -> None:
    rows = sentences(9, seed=1)
    results = {}
    for fmt in ("csv", "jsonl", "parquet", "disk"):
        path = _write(fmt, rows, tmp_path)
        split = ["--split", "validation"] if fmt == "disk" else []
        store = tmp_path / f"{fmt}.zarr"
        code, _, err = run_cli(
            [
                "--model",
                str(model_dirs["bert-cls"]),
                "--data",
                str(path),
                *split,
                "--text-fields",
                "text,text_b",
                "--estimator",
                "empirical",
                "--store",
                str(store),
            ],
            capsys,
        )
        assert code == 0, err
        group = zarr.open_group(str(store), mode="r")
        assert group.attrs["n_examples"] == 9
        results[fmt] = {k: group[k][...] for k in group.array_keys()}
    for fmt in ("jsonl", "parquet", "disk"):
        for k, ref in results["csv"].items():
            np.testing.assert_allclose(results[fmt][k], ref, rtol=1e-5, atol=1e-12)


def test_selection_is_deterministic_and_seeded(model_dirs, csv_data, tmp_path, capsys) -> None:
    fps = []
    for seed in (0, 0, 1):
        store = tmp_path / f"s{len(fps)}.zarr"
        code, _, err = run_cli(
            [
                "--model",
                str(model_dirs["bert-cls"]),
                "--data",
                str(csv_data),
                "--examples",
                "5",
                "--seed",
                str(seed),
                "--estimator",
                "sampled",
                "--store",
                str(store),
            ],
            capsys,
        )
        assert code == 0, err
        fps.append(zarr.open_group(str(store), mode="r").attrs["data_fingerprint"])
    assert fps[0] == fps[1] != fps[2]
    a = zarr.open_group(str(tmp_path / "s0.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "s1.zarr"), mode="r")
    for k in a.array_keys():
        np.testing.assert_array_equal(a[k][...], b[k][...])


def test_causal_lm_sampled_through_cli(model_dirs, csv_data, tmp_path, capsys) -> None:
    store = tmp_path / "lm.zarr"
    code, out, err = run_cli(
        [
            "--model",
            str(model_dirs["llama-lm"]),
            "--data",
            str(csv_data),
            "--estimator",
            "sampled",
            "--examples",
            "6",
            "--store",
            str(store),
        ],
        capsys,
    )
    assert code == 0, err
    group = zarr.open_group(str(store), mode="r")
    assert set(group.array_keys()) == set(checkpoint_keys(model_dirs["llama-lm"]))
    assert group.attrs["head"] == "causal_lm"
    assert sum(float(group[k][...].sum()) for k in group.array_keys()) > 0


def test_console_script_runs_without_traceback(model_dirs, csv_data, tmp_path) -> None:
    store = tmp_path / "x.zarr"
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "fishmerge.flows.cli",
            "fisher",
            "--model",
            str(model_dirs["gpt2-cls"]),
            "--data",
            str(csv_data),
            "--examples",
            "4",
            "--store",
            str(store),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == str(store.absolute())
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "fishmerge.flows.cli",
            "fisher",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            str(csv_data),
            "--store",
            str(tmp_path / "y.zarr"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "does not exist" in bad.stderr
    assert not (tmp_path / "y.zarr").exists()
