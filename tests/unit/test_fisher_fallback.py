"""Modules without a rule: the vmap fallback matches the oracle, or they are rejected loudly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fishmerge.errors import FishmergeError
from fishmerge.fisher.engine import FisherAccumulator, estimate_fisher
from torch import nn

from tests.oracle import naive_fisher
from tests.tiny_models import build
from tests.unit.test_fisher_oracle import assert_close, make_batches, make_examples


class GainLinear(nn.Module):
    """A parameter-holding module no rule knows: y = (x Wᵀ + b) ⊙ g."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().clone())
        self.bias = nn.Parameter(lin.bias.detach().clone())
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, lin.out_features))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.gain


class SneakyHead(nn.Module):
    """Uses its child's weight without calling the child: hooks on the child never fire."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.inner = lin

    def forward(self, x):
        return F.linear(x, self.inner.weight, self.inner.bias)


def custom_bert():
    model = build("bert-cls")
    layer = model.bert.encoder.layer[0]
    layer.intermediate.dense = GainLinear(layer.intermediate.dense)
    model.classifier = GainLinear(model.classifier)
    return model


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_vmap_fallback_matches_oracle(estimator: str) -> None:
    model = custom_bert()
    examples = make_examples(model)
    ref = naive_fisher(model, examples, estimator, "sequence_classification", seed=1)
    with FisherAccumulator(model, estimator, seed=1) as acc:
        assert sorted(acc.fallback_modules) == [
            "bert.encoder.layer.0.intermediate.dense (GainLinear)",
            "classifier (GainLinear)",
        ]
        for batch, ids in make_batches(model, examples, 3):
            acc.add_batch(batch, ids)
        ours = acc.fisher()
    assert_close(ours, ref)
    assert float(ours["classifier.gain"].sum()) > 0


def test_unknown_module_rejected_when_fallback_is_error() -> None:
    with pytest.raises(FishmergeError, match=r"no per-layer rule .*classifier \(GainLinear\).*fallback"):
        FisherAccumulator(custom_bert(), "exact", fallback="error")


def test_parameter_used_outside_its_module_fails_loudly() -> None:
    model = build("bert-cls")
    model.classifier = SneakyHead(model.classifier)
    examples = make_examples(model)
    with pytest.raises(FishmergeError, match="classifier.inner.weight"):
        estimate_fisher(model, make_batches(model, examples, 3), "exact")


def test_broadcast_position_ids_are_refused() -> None:
    model = build("bert-cls")
    examples = make_examples(model)
    batch, ids = next(make_batches(model, examples, 3))
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)  # (1, T), broadcast
    with FisherAccumulator(model, "exact") as acc, pytest.raises(FishmergeError, match="broadcast"):
        acc.add_batch(batch, ids)


def test_oracle_comparison_detects_a_squared_batch_gradient() -> None:
    """Negative control: the common mistake (square the batch gradient) fails the same comparison."""
    model = build("bert-cls")
    examples = make_examples(model)
    ref = naive_fisher(model, examples, "empirical", "sequence_classification")
    params = dict(model.named_parameters())
    wrong = {k: torch.zeros_like(p) for k, p in params.items()}
    for batch, _ in make_batches(model, examples, len(examples)):
        logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        loss = logp.gather(1, batch["labels"].unsqueeze(1)).sum()
        for (k, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                wrong[k] += g.square() / len(examples)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(wrong, ref)
