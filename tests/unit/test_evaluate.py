"""lib/fishmerge/pipeline/evaluation.py against independent oracles: scikit-learn metrics, per-example unpadded forwards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fishmerge.errors import FishmergeError
from fishmerge.io.data import BATCH_COST_TOKENS, batch_cost_for, length_batches
from fishmerge.pipeline.evaluation import (
    accuracy,
    class_probabilities,
    classification_metrics,
    ensemble_probabilities,
    label_ids,
    load_eval_rows,
    macro_f1,
    perplexity,
)
from sklearn.metrics import accuracy_score, f1_score

from tests.conftest import SPECIAL, WORDS, save_model_dir, sentences


def word_tokenizer():
    """A word-level BERT tokenizer that knows tests.conftest.WORDS (so rows differ in content, not only length)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("eval-models")
    cls_dir = save_model_dir(root / "bert-cls", "bert-cls")
    lm_dir = save_model_dir(root / "llama-lm", "llama-lm")
    return {
        "cls": AutoModelForSequenceClassification.from_pretrained(cls_dir),
        "lm": AutoModelForCausalLM.from_pretrained(lm_dir),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=57)
    p = rng.integers(0, 3, size=57)  # class 3 is never predicted
    p[:3] = 4  # class 4 is predicted but never a label
    assert accuracy(y, p) == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro", zero_division=0), abs=1e-12)
    assert macro_f1(y, p, num_classes=6) == pytest.approx(
        f1_score(y, p, average="macro", labels=list(range(6)), zero_division=0), abs=1e-12
    )


def test_classification_metrics_from_probs() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), size=40)
    y = rng.integers(0, 3, size=40)
    m = classification_metrics(probs, y)
    pred = probs.argmax(1)
    assert m == pytest.approx({"accuracy": accuracy_score(y, pred), "f1": f1_score(y, pred, average="macro")})
    assert list(classification_metrics(probs, y, metrics=["f1"])) == ["f1"]


def test_bad_metric_name_lists_valid_ones() -> None:
    with pytest.raises(FishmergeError, match=r"unknown metric.*'acc'.*accuracy, f1"):
        classification_metrics(np.full((2, 2), 0.5), [0, 1], metrics=("acc",))


def test_bad_shapes_and_labels() -> None:
    with pytest.raises(FishmergeError, match="3 labels but 2 predictions"):
        accuracy([0, 1, 2], [0, 1])
    with pytest.raises(FishmergeError, match="2 classes"):
        classification_metrics(np.full((2, 2), 0.5), [0, 2])
    with pytest.raises(FishmergeError, match="outside 0..1"):
        macro_f1([0, 2], [0, 1], num_classes=2)


def test_ensemble_probabilities() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.dirichlet(np.ones(3), size=5), rng.dirichlet(np.ones(3), size=5)
    np.testing.assert_allclose(ensemble_probabilities([a, b], [3, 1]), 0.75 * a + 0.25 * b, rtol=1e-12)
    with pytest.raises(FishmergeError, match="differ in shape"):
        ensemble_probabilities([a, b[:4]], [1, 1])
    with pytest.raises(FishmergeError, match="≥ 0"):
        ensemble_probabilities([a, b], [1, -1])
    with pytest.raises(FishmergeError, match="2 model outputs but 1 weights"):
        ensemble_probabilities([a, b], [1])


def oracle_class_probs(model, tok, rows, fields) -> np.ndarray:
    """One example at a time, no padding, plain forward."""
    out = []
    with torch.no_grad():
        for r in rows:
            enc = tok(*[r[f] for f in fields], return_tensors="pt")
            out.append(torch.softmax(model(**enc).logits.double(), -1)[0].numpy())
    return np.stack(out)


@pytest.mark.parametrize("fields", [["text"], ["text", "text_b"]])
def test_class_probabilities_vs_unpadded_loop(models, fields) -> None:
    tok = word_tokenizer()
    rows = sentences(13, seed=5)
    got = class_probabilities(models["cls"], tok, rows, fields, batch_size=4, max_length=24, progress=False)
    want = oracle_class_probs(models["cls"], tok, rows, fields)
    assert got.shape == (13, 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    assert np.ptp(got[:, 0]) > 1e-3  # rows really differ: the check is not vacuous


def test_length_batches_group_rows_of_similar_length() -> None:
    lengths = [40, 3, 17, 64, 16, 5, 33, 3, 70]
    batches = length_batches(lengths, 4)
    assert sorted(i for idx, _ in batches for i in idx) == list(range(len(lengths)))  # every row once
    flat = [i for idx, _ in batches for i in idx]
    assert flat == [1, 7, 5, 4, 2, 6, 0, 3, 8]  # by length, ties in row order
    assert all(len(idx) <= 4 for idx, _ in batches)
    assert all(w == max(lengths[i] for i in idx) for idx, w in batches)  # as wide as its longest row, no rounding
    assert [w for _, w in length_batches([1, 2], 8)] == [2]
    assert [w for _, w in length_batches([0, 0], 4)] == [1]  # never an empty width
    assert length_batches([], 4) == []
    with pytest.raises(FishmergeError, match="batch size must be positive"):
        length_batches(lengths, 0)


def _cut_cost(batches) -> int:
    return sum(len(idx) * w + BATCH_COST_TOKENS for idx, w in batches)


@pytest.mark.parametrize("seed", range(6))
def test_length_batches_cut_is_the_cheapest(seed) -> None:
    """Oracle: every way of cutting the sorted rows into consecutive batches of at most batch_size rows,
    enumerated; the chosen cut costs the least padded tokens + BATCH_COST_TOKENS per batch."""
    rng = np.random.default_rng(seed)
    n, batch_size = int(rng.integers(1, 11)), int(rng.integers(1, 6))
    lengths = rng.integers(0, [8, 200][seed % 2], size=n).tolist()
    got = length_batches(lengths, batch_size)
    assert sorted(i for idx, _ in got for i in idx) == list(range(n))
    assert all(1 <= len(idx) <= batch_size for idx, _ in got)
    widths = sorted(max(1, x) for x in lengths)
    best = None
    for mask in range(2 ** (n - 1)):  # bit k set: a cut after the (k+1)-th shortest row
        ends = [k + 1 for k in range(n - 1) if mask >> k & 1] + [n]
        starts = [0] + ends[:-1]
        if any(e - s > batch_size for s, e in zip(starts, ends)):
            continue
        cost = sum((e - s) * widths[e - 1] + BATCH_COST_TOKENS for s, e in zip(starts, ends))
        best = cost if best is None else min(best, cost)
    assert _cut_cost(got) == best
    equal = [
        (list(range(s, min(s + batch_size, n))), widths[min(s + batch_size, n) - 1]) for s in range(0, n, batch_size)
    ]
    assert _cut_cost(got) <= _cut_cost(equal)
    # without a batch cost (accelerators): the fewest batches, and among those the least padding
    fewest = length_batches(lengths, batch_size, batch_cost=None)
    assert len(fewest) == len(equal)
    assert sum(len(i) * w for i, w in fewest) <= sum(len(i) * w for i, w in equal)
    assert sorted(i for idx, _ in fewest for i in idx) == list(range(n))


def test_batch_cost_by_device() -> None:
    assert batch_cost_for("cpu") == BATCH_COST_TOKENS
    assert batch_cost_for(torch.device("cpu")) == BATCH_COST_TOKENS
    assert batch_cost_for("cuda:0") is None  # a device object only: no GPU needed


def oracle_perplexity(model, tok, texts, max_length) -> float:
    """Per text, unpadded: NLL by hand from log_softmax + gather of each next token."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def test_perplexity_vs_unpadded_loop(models) -> None:
    tok = word_tokenizer()
    texts = [r["text"] for r in sentences(11, seed=6)]
    texts.append(" ".join(WORDS[:40]))  # longer than max_length: truncated the same way
    lengths = {len(tok(t, truncation=True, max_length=20)["input_ids"]) for t in texts}
    assert len(lengths) > 3  # examples of different lengths share padded batches
    got = perplexity(models["lm"], tok, texts, batch_size=5, max_length=20, progress=False)
    want = oracle_perplexity(models["lm"], tok, texts, max_length=20)
    assert got == pytest.approx(want, rel=1e-5)
    assert got > 1.0


def test_perplexity_needs_a_token_to_predict(models) -> None:
    tok = word_tokenizer()
    with pytest.raises(FishmergeError, match="no token to predict"):
        perplexity(models["lm"], tok, [], progress=False)


def test_data_fingerprint_by_hand_and_rows_in_order(csv_data) -> None:
    """The data fingerprint (part of every Fisher id) against the recipe computed from the CSV by the csv
    module, for a shuffled selection; the rows read in one slice come back in the selection's order."""
    import csv
    import hashlib
    import json

    from fishmerge.io.data import column_values, data_fingerprint, load_split

    with open(csv_data, newline="") as f:
        table = list(csv.DictReader(f))
    indices, fields = [17, 3, 9, 0, 22], ["text", "label"]
    h = hashlib.sha256()
    for i in indices:
        h.update(json.dumps([i, [table[i][f] for f in fields]]).encode())
    dataset = load_split(str(csv_data), "train")
    assert data_fingerprint(dataset, indices, fields) == "sha256:" + h.hexdigest()
    columns = column_values(dataset.select(indices), ["text", "label", "text"])
    assert list(columns) == ["text", "label"]
    assert columns["text"] == [table[i]["text"] for i in indices]
    assert columns["label"] == [int(table[i]["label"]) for i in indices]
    assert column_values(dataset.select([]), fields) == {"text": [], "label": []}


def test_load_eval_rows_and_labels(csv_data) -> None:
    rows = load_eval_rows(str(csv_data), "train", ["text", "text_b"], "label", limit=5)
    assert len(rows) == 5 and set(rows[0]) == {"text", "text_b", "label"}
    assert [r["label"] for r in rows] == [i % 3 for i in range(5)]
    assert len(load_eval_rows(str(csv_data), "train", ["text"], None)) == 23
    np.testing.assert_array_equal(label_ids([{"y": "pos"}, {"y": "neg"}], "y", {"neg": 0, "pos": 1}), [1, 0])
    with pytest.raises(FishmergeError, match="'nope'"):
        load_eval_rows(str(csv_data), "train", ["nope"], "label")
    with pytest.raises(FishmergeError, match="'validation'"):
        load_eval_rows(str(csv_data), "validation", ["text"], "label")
