"""The hook engine against the naive per-example oracle, on tiny BERT, RoBERTa, GPT-2 and Llama."""

from __future__ import annotations

import pytest
import torch
from fishmerge.fisher.engine import estimate_fisher
from fishmerge.fisher.estimators import detect_head

from tests.oracle import naive_fisher
from tests.tiny_models import VOCAB, build

N_EXAMPLES = 7


def make_examples(model, seed: int = 1, n: int = N_EXAMPLES) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    num_labels = getattr(cfg, "num_labels", 2)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        ex = {"id": 100 + 3 * i, "input_ids": ids}
        if num_labels == 1:
            ex["label"] = float(torch.randn(1, generator=g))
        else:
            ex["label"] = int(torch.randint(0, num_labels, (1,), generator=g))
        ex["labels"] = torch.randint(0, num_labels, (length,), generator=g).tolist()
        out.append(ex)
    return out


def make_batches(model, examples, batch_size: int, side: str = "right", extra_pad: int = 2):
    pad = model.config.pad_token_id
    width = max(len(e["input_ids"]) for e in examples) + extra_pad
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids, mask, tok = [], [], []
        for e in chunk:
            k = width - len(e["input_ids"])
            body, m, t = e["input_ids"], [1] * len(e["input_ids"]), e["labels"]
            if side == "right":
                ids.append(body + [pad] * k), mask.append(m + [0] * k), tok.append(t + [-100] * k)
            else:
                ids.append([pad] * k + body), mask.append([0] * k + m), tok.append([-100] * k + t)
        batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if detect_head(model) == "token_classification":
            batch["labels"] = torch.tensor(tok)
        else:
            batch["labels"] = torch.tensor([e["label"] for e in chunk])
        yield batch, [e["id"] for e in chunk]


def assert_close(ours: dict, ref: dict, tol: float = 1e-5) -> None:
    assert set(ours) == set(ref)
    total = sum(float(v.sum()) for v in ref.values())
    assert total > 0, "oracle Fisher is all zero: the test would be vacuous"
    # Tensors that are zero in exact arithmetic (e.g. attention key biases) hold rounding noise only:
    # compare those against a floor far below any real entry.
    floor = 1e-9 * float(torch.stack([v.double().norm() for v in ref.values()]).norm())
    for k in ref:
        r, o = ref[k].double(), ours[k].double()
        scale = float(r.norm())
        err = float((o - r).norm())
        assert err <= tol * scale + floor, f"{k}: relative error {err / max(scale, 1e-30):.2e}"


CASES = [
    ("bert-cls", "exact"),
    ("bert-cls", "sampled"),
    ("bert-cls", "empirical"),
    ("bert-reg", "exact"),
    ("bert-reg", "sampled"),
    ("bert-reg", "empirical"),
    ("bert-tok", "sampled"),
    ("bert-tok", "empirical"),
    ("roberta-cls", "exact"),
    ("roberta-cls", "sampled"),
    ("roberta-cls", "empirical"),
    ("gpt2-cls", "exact"),
    ("gpt2-cls", "sampled"),
    ("gpt2-cls", "empirical"),
    ("gpt2-lm", "sampled"),
    ("gpt2-lm", "empirical"),
    ("llama-lm", "sampled"),
    ("llama-lm", "empirical"),
    ("llama-lm-tied", "sampled"),
    ("llama-lm-tied", "empirical"),
    ("llama-cls", "exact"),
    ("llama-cls", "sampled"),
    ("llama-cls", "empirical"),
]


@pytest.mark.parametrize(("name", "estimator"), CASES)
def test_engine_matches_naive_oracle(name: str, estimator: str) -> None:
    model = build(name)
    head = detect_head(model)
    examples = make_examples(model)
    ref = naive_fisher(model, examples, estimator, head, seed=5)
    ours = estimate_fisher(model, make_batches(model, examples, batch_size=3), estimator, seed=5)
    assert_close(ours, ref)


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm-tied", "llama-cls"])
def test_left_padding_and_tiny_memory_budget(name: str) -> None:
    """Left padding, one-example sub-chunks (max_memory=1) and batch size 4 give the same Fisher."""
    model = build(name)
    estimator = "sampled"
    examples = make_examples(model, seed=3)
    ref = naive_fisher(model, examples, estimator, detect_head(model), seed=2)
    batches = make_batches(model, examples, batch_size=4, side="left", extra_pad=3)
    ours = estimate_fisher(model, batches, estimator, seed=2, max_memory=1)
    assert_close(ours, ref)


def test_tied_weights_are_summed_before_squaring() -> None:
    """GPT-2's lm_head shares wte: the Fisher of the tied tensor is not the sum of the two uses' Fishers."""
    model = build("gpt2-lm")
    examples = make_examples(model, seed=4)
    ours = estimate_fisher(model, make_batches(model, examples, 4), "empirical")
    assert "lm_head.weight" not in ours and "transformer.wte.weight" in ours
    ref = naive_fisher(model, examples, "empirical", "causal_lm")
    assert_close(ours, ref)


@pytest.mark.parametrize("name", ["bert-cls", "gpt2-lm", "llama-lm"])
def test_batched_bmm_path_used_on_gpu_matches_oracle(name: str, monkeypatch) -> None:
    """The chunked-bmm path (the GPU default) checked on CPU, with chunks of 2 examples."""
    from fishmerge.fisher import rules as fisher_rules

    monkeypatch.setattr(fisher_rules, "PER_EXAMPLE_LOOP_DEVICES", set())
    model = build(name)
    estimator = "sampled"
    examples = make_examples(model, seed=6)
    ref = naive_fisher(model, examples, estimator, detect_head(model), seed=9)
    budget = 2 * 4 * max(p.numel() for p in model.parameters() if p.dim() == 2)
    ours = estimate_fisher(model, make_batches(model, examples, 4), estimator, seed=9, max_memory=budget)
    assert_close(ours, ref)
