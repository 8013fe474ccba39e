"""Shared fixtures: tiny HF model folders (built from configs, saved as safetensors) and small datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Commands run in their own process: never in a warm runner the developer may have running in ~/.fishmerge
# (tests/integration/test_warm_runner.py starts its own and lifts this).
os.environ.setdefault("FISHMERGE_NO_WARM", "1")

WORDS = [f"w{i}" for i in range(90)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(tmp: Path):
    # transformers 5 ignores `vocab_file` here (every word became [UNK]): pass the vocabulary itself.
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)})


def save_model_dir(path: Path, name: str, seed: int = 0) -> Path:
    """Save tiny model `name` (tests/tiny_models.py) with a local word-level tokenizer."""
    from tests.tiny_models import build

    model = build(name, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.config.pad_token_id = 0
    if getattr(model.config, "num_labels", None) == 2:
        model.config.id2label = {0: "neg", 1: "pos"}
        model.config.label2id = {"neg": 0, "pos": 1}
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path).save_pretrained(path)
    return path


def sentences(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(2, 9)
        rows.append(
            {
                "text": " ".join(rng.choice(WORDS) for _ in range(k)),
                "text_b": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))),
                "label": i % 3,
            }
        )
    return rows


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: save_model_dir(root / name, name) for name in ("bert-cls", "llama-lm", "gpt2-cls")}


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    """Rows as a CSV file with a header (the columns of the first row unless given)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def csv_data(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "rows.csv", sentences(23))
