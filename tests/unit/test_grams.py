"""Input Gram matrices from the Fisher engine's pass against a naive per-token loop (tests/oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fishmerge.errors import FishmergeError
from fishmerge.fisher.engine import FisherAccumulator, estimate_fisher

from tests.oracle import naive_grams
from tests.tiny_models import build
from tests.unit.test_fisher_oracle import make_batches, make_examples


def accumulate(model, examples, statistics, side="right", batch_size=3, estimator="empirical"):
    with FisherAccumulator(model, estimator, statistics=statistics) as acc:
        for batch, ids in make_batches(model, examples, batch_size, side=side, extra_pad=3):
            acc.add_batch(batch, ids)
        return acc


def check_against_oracle(grams, ref, tol, absent=()):
    by_weight = {w: g for g in grams.values() for w in g.weights}
    assert set(by_weight) == set(ref) - set(absent)
    for w, g in by_weight.items():
        want, count = ref[w]
        assert g.tokens == count, f"{w}: {g.tokens} rows counted, the loop counted {count}"
        got = g.sum.double().numpy()
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err <= tol, f"{w}: relative error {err:.2e}"


@pytest.mark.parametrize(
    ("name", "side"),
    [
        ("bert-cls", "right"),
        ("gpt2-lm", "right"),
        ("gpt2-lm", "left"),
        ("llama-lm", "left"),
        ("llama-lm-tied", "right"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grams_match_per_token_loop(name, side, dtype):
    model = build(name).to(dtype)
    examples = make_examples(model, seed=2)
    ref = naive_grams(model, examples)
    acc = accumulate(model, examples, ("fisher", "gram"), side=side)
    grams = acc.grams()
    tied = name in ("gpt2-lm", "llama-lm-tied")  # lm_head shares the embedding: not a plain Linear, no Gram
    check_against_oracle(grams, ref, 1e-10 if dtype == torch.float64 else 1e-5, {"lm_head.weight"} if tied else ())
    layouts = {w: lay for g in grams.values() for w, lay in g.layouts.items()}
    if name.startswith("gpt2"):
        assert layouts["transformer.h.0.attn.c_attn.weight"] == "in_out"  # Conv1D stores (in, out)
        assert "lm_head.weight" not in layouts  # tied to wte
    if name == "llama-lm":
        assert layouts["lm_head.weight"] == "out_in"
        shared = grams["model.layers.0.self_attn.q_proj.weight"].weights
        assert shared == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]  # one Gram for q/k/v
    if name == "llama-lm-tied":
        assert "lm_head.weight" not in layouts


def test_gram_only_pass_equals_gram_with_fisher_and_skips_the_fisher():
    model = build("bert-cls")
    examples = make_examples(model, seed=4)
    both = accumulate(model, examples, ("fisher", "gram")).grams()
    alone = accumulate(model, examples, ("gram",))
    for k, g in alone.grams().items():
        assert torch.equal(g.sum, both[k].sum) and g.tokens == both[k].tokens
    with pytest.raises(FishmergeError, match="not asked for the Fisher"):
        alone.fisher()


def test_fisher_is_unchanged_by_gram_statistics():
    model = build("llama-lm")
    examples = make_examples(model, seed=5)
    plain = estimate_fisher(model, make_batches(model, examples, 3), "sampled", seed=1)
    with_grams = estimate_fisher(
        model, make_batches(model, examples, 3), "sampled", seed=1, statistics=("fisher", "gram")
    )
    assert all(torch.equal(plain[k], with_grams[k]) for k in plain)


def test_unknown_statistic_and_missing_grams_are_refused():
    model = build("bert-cls")
    with pytest.raises(FishmergeError, match="unknown statistics"):
        FisherAccumulator(model, "exact", statistics=("hessian",))
    with pytest.raises(FishmergeError, match="not asked for Gram"):
        FisherAccumulator(model, "exact").grams()


@pytest.mark.parametrize("block", [16, 20])
def test_blocked_upper_triangle_path_matches_loop(block, monkeypatch):
    """Wide Grams are formed block by block (upper triangle, mirrored at the end): checked here on tiny
    widths (32 and 48 split into 2–3 blocks, uneven at 20) against the per-token loop."""
    from fishmerge.fisher import grams as grams_module

    monkeypatch.setattr(grams_module, "SYMMETRIC_BLOCK", block)
    model = build("llama-lm").double()
    examples = make_examples(model, seed=7)
    ref = naive_grams(model, examples)
    grams = accumulate(model, examples, ("gram",), side="left").grams()
    check_against_oracle(grams, ref, 1e-10)
    for g in grams.values():
        assert torch.equal(g.sum, g.sum.t())
