"""Bad input: one readable line, exit code 2, and nothing written at the store path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fishmerge.flows.cli import main
from safetensors.torch import load_file, save_file

from tests.conftest import save_model_dir, sentences, write_csv


def fails(args: list[str], tmp_path: Path, capsys, *needles: str) -> None:
    store = tmp_path / "out.zarr"
    code = main(["fisher", "--no-progress", *args, "--store", str(store)])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("fishmerge: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not store.exists()
    assert not list(tmp_path.glob(".out.zarr*")), "temporary store left behind"


def test_missing_model_dir(tmp_path, csv_data, capsys) -> None:
    fails(["--model", str(tmp_path / "missing"), "--data", str(csv_data)], tmp_path, capsys, "does not exist")


def test_model_dir_without_safetensors(tmp_path, csv_data, capsys) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"not really")
    fails(["--model", str(d), "--data", str(csv_data)], tmp_path, capsys, "no .safetensors", "never unpickles")


def test_base_model_without_head(tmp_path, csv_data, capsys) -> None:
    from transformers import BertConfig, BertModel

    d = tmp_path / "base"
    BertModel(
        BertConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(d)
    fails(["--model", str(d), "--data", str(csv_data)], tmp_path, capsys, "task head")


def test_unknown_text_column_lists_columns(model_dirs, csv_data, tmp_path, capsys) -> None:
    fails(
        ["--model", str(model_dirs["bert-cls"]), "--data", str(csv_data), "--text-fields", "sentence"],
        tmp_path,
        capsys,
        "['sentence']",
        "text, text_b, label",
    )


def test_unknown_label_column(model_dirs, csv_data, tmp_path, capsys) -> None:
    fails(
        [
            "--model",
            str(model_dirs["bert-cls"]),
            "--data",
            str(csv_data),
            "--label-field",
            "gold",
            "--estimator",
            "empirical",
        ],
        tmp_path,
        capsys,
        "['gold']",
        "text, text_b, label",
    )


def test_labels_out_of_range(model_dirs, tmp_path, capsys) -> None:
    rows = sentences(6)
    rows[4]["label"] = 7
    data = write_csv(tmp_path / "bad.csv", rows)
    fails(
        ["--model", str(model_dirs["bert-cls"]), "--data", str(data), "--estimator", "empirical"],
        tmp_path,
        capsys,
        "[7]",
        "example 4",
        "[0, 3)",
    )


def test_exact_on_vocabulary_sized_output(model_dirs, csv_data, tmp_path, capsys) -> None:
    fails(
        ["--model", str(model_dirs["llama-lm"]), "--data", str(csv_data), "--estimator", "exact"],
        tmp_path,
        capsys,
        "--estimator sampled",
    )


def test_nan_logits_name_the_example(tmp_path, csv_data, capsys) -> None:
    d = save_model_dir(tmp_path / "nan", "bert-cls")
    weights = load_file(d / "model.safetensors")
    weights["classifier.weight"][1, :] = torch.nan
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    fails(
        ["--model", str(d), "--data", str(csv_data), "--examples", "3"],
        tmp_path,
        capsys,
        "NaN/Inf logits",
        "example(s) [",
    )


def test_empty_dataset(model_dirs, tmp_path, capsys) -> None:
    data = write_csv(tmp_path / "empty.csv", [], fields=["text", "label"])
    fails(["--model", str(model_dirs["bert-cls"]), "--data", str(data)], tmp_path, capsys, "empty")


def test_unknown_split(model_dirs, tmp_path, capsys) -> None:
    import datasets

    d = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sentences(3))}).save_to_disk(str(d))
    fails(
        ["--model", str(model_dirs["bert-cls"]), "--data", str(d), "--split", "dev"], tmp_path, capsys, "'dev'", "train"
    )


@pytest.mark.parametrize("device", ["cuda", "tpu"])
def test_bad_device(model_dirs, csv_data, tmp_path, capsys, device) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    fails(
        ["--model", str(model_dirs["bert-cls"]), "--data", str(csv_data), "--device", device],
        tmp_path,
        capsys,
        "device",
    )
