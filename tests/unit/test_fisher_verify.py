"""The engine's one-time structure check: a weight used outside its module's forward is refused, and a
first batch whose gradient is all zero (rows with nothing to predict) does not use the check up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fishmerge.errors import FishmergeError
from fishmerge.fisher.engine import FisherAccumulator
from torch import nn


class Sneaky(nn.Module):
    """A tiny causal LM whose head weight is also used by a bare matmul, outside the Linear's forward."""

    def __init__(self, sneaky: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20)
        self.sneaky = sneaky

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        logits = self.head(h)
        if self.sneaky:
            logits = logits + h @ self.head.weight.t()
        return SimpleNamespace(logits=logits)


def batch(n: int, t: int) -> dict:
    g = torch.Generator().manual_seed(t)
    return {
        "input_ids": torch.randint(1, 20, (n, t), generator=g),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
    }


@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
def test_a_weight_used_outside_its_module_is_refused(estimator: str) -> None:
    with FisherAccumulator(Sneaky(), estimator, head="causal_lm") as acc:
        with pytest.raises(FishmergeError, match="do not reproduce the gradient of parameter 'head.weight'"):
            acc.add_batch(batch(3, 5), [0, 1, 2])


def test_an_all_zero_first_batch_leaves_the_check_for_the_next() -> None:
    with FisherAccumulator(Sneaky(), "empirical", head="causal_lm") as acc:
        acc.add_batch(batch(2, 1), [0, 1])  # one token per row: nothing to predict, a zero gradient
        assert acc.verify_pending
        with pytest.raises(FishmergeError, match="'head.weight'"):
            acc.add_batch(batch(2, 4), [2, 3])
    with FisherAccumulator(Sneaky(sneaky=False), "empirical", head="causal_lm") as acc:
        acc.add_batch(batch(2, 1), [0, 1])
        acc.add_batch(batch(2, 4), [2, 3])  # the honest model passes the check, which is then done
        assert not acc.verify_pending
