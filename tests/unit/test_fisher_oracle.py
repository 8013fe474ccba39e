"""The hook engine against the naive per-example oracle, on tiny BERT, RoBERTa, GPT-2 and Llama."""

from __future__ import annotations

import re

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
        head = detect_head(model)
        if head == "token_classification":
            batch["labels"] = torch.tensor(tok)
        elif head == "sequence_classification":  # a causal LM's labels would be per-token masks: none here
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
    ("bert-cls2", "exact"),  # binary: one backward pass
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


@pytest.mark.parametrize("classes", [2, 3, 7, 64])
def test_exact_weights_factor_the_softmax_covariance(classes: int) -> None:
    """C − 1 weight vectors per example whose outer products sum to diag(p) − p pᵀ entry by entry
    (relative to √(pᵢpⱼ), so a confident row's tiny entries count), each summing to zero (so their
    gradient through log-softmax is the logits' Jacobian times u): uniform, random, near-one-hot rows
    on the first and the last class, and rows with exact zeros."""
    from fishmerge.fisher.estimators import covariance_roots

    g = torch.Generator().manual_seed(classes)
    zeros = torch.zeros(1, classes)
    zeros[0, 1:] = -float("inf")  # p = (1, 0, …, 0): no Fisher at all
    half = torch.full((1, classes), -float("inf"))
    half[0, :2] = 0.0  # two classes at ½, the rest exactly 0
    logits = torch.cat(
        [
            torch.zeros(1, classes),
            torch.randn(5, classes, generator=g) * 3,
            30.0 * torch.eye(classes)[[0, classes - 1]],
            zeros,
            half,
        ]
    )
    logp = torch.log_softmax(logits.double(), -1)
    roots = covariance_roots(logp)
    assert len(roots) == classes - 1
    p = logp.exp()
    want = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    got = sum(u[:, :, None] * u[:, None, :] for u in roots)
    scale = (p[:, :, None] * p[:, None, :]).sqrt()
    assert bool(((got - want).abs() <= 1e-10 * scale + 1e-300).all())
    assert bool(torch.isfinite(got).all())
    size = torch.stack([u.abs().sum(1) for u in roots])
    assert bool((torch.stack([u.sum(1) for u in roots]).abs() <= 1e-12 * size + 1e-300).all())
    assert bool((got[-2] == 0).all())  # a one-hot row: exactly no Fisher
    # fp32 log-probabilities (the engine's): the weights come back in fp32, still a factorization
    roots32 = covariance_roots(logp.float())
    assert all(u.dtype == torch.float32 for u in roots32)
    got32 = sum(u.double()[:, :, None] * u.double()[:, None, :] for u in roots32)
    torch.testing.assert_close(got32, want, atol=1e-6, rtol=0)


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


def _tied_examples(model, seed: int) -> list[dict]:
    """Short LM examples over a few ids, so rows repeat within an example, with the pad id among real tokens."""
    g = torch.Generator().manual_seed(seed)
    pad = model.config.pad_token_id
    out = []
    for i in range(N_EXAMPLES):
        length = int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(3, 9, (length,), generator=g).tolist()
        ids[int(torch.randint(0, length, (1,), generator=g))] = pad
        ids += [VOCAB - 1 - i] if i % 2 else []  # rows in other vocabulary blocks too
        out.append({"id": 50 + i, "input_ids": ids, "label": 0, "labels": [0] * len(ids)})  # labels unused by LMs
    return out


@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
@pytest.mark.parametrize(("name", "side"), [("gpt2-lm", "right"), ("llama-lm-tied", "left")])
@pytest.mark.parametrize("path", ["cpu-blocks", "bmm-chunks"])
def test_tied_embedding_head_fp64(name: str, side: str, path: str, estimator: str, monkeypatch) -> None:
    """The tied embedding / LM-head path (sparse embedding rows added into the head's per-example
    product before squaring) against the oracle in fp64: padding, repeated rows, the pad id as a
    real token (Llama's padding_idx row gets no embedding gradient, GPT-2's wte has none), several
    vocabulary blocks on CPU, sub-chunks on the bmm (GPU) path. No dense per-example embedding
    gradient may be built."""
    from fishmerge.fisher import rules as fisher_rules

    def no_dense(*args, **kwargs):
        raise AssertionError("the tied path built a dense per-example embedding gradient")

    monkeypatch.setattr(fisher_rules.EmbeddingRule, "per_example", no_dense)
    hidden = 32
    if path == "cpu-blocks":
        monkeypatch.setattr(fisher_rules, "CPU_BLOCK_BYTES", 4 * hidden * 10)  # ~10 vocabulary rows a block
    else:
        monkeypatch.setattr(fisher_rules, "PER_EXAMPLE_LOOP_DEVICES", set())
    model = build(name).double()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    examples = _tied_examples(model, seed=7)
    ref = naive_fisher(model, examples, estimator, "causal_lm", seed=3)
    budget = 2 * 4 * VOCAB * hidden  # two examples' (vocab, hidden) products at a time on the bmm path
    batches = make_batches(model, examples, batch_size=4, side=side, extra_pad=2)
    ours = estimate_fisher(model, batches, estimator, seed=3, max_memory=budget)
    tied = "transformer.wte.weight" if name == "gpt2-lm" else "model.embed_tokens.weight"
    assert float(ref[tied].sum()) > 0
    assert_close(ours, ref, tol=1e-6)


def test_sample_from_probs_equals_one_whole_fp64_cdf(monkeypatch) -> None:
    """The row-chunked searchsorted draw gives exactly #{c : cdf[c] < u · cdf[-1]} of one fp64 cumsum,
    across chunk boundaries, with zero-probability classes and u = 0."""
    from fishmerge.fisher import estimators

    monkeypatch.setitem(estimators.CDF_CHUNK_BYTES, "cpu", 8 * 97 * 3)  # 3 rows a chunk
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4, 5, 97, generator=g)
    probs[..., ::4] = 0
    u = torch.rand(4, 5, generator=g, dtype=torch.float64)
    u[0, 0] = 0.0
    cdf = probs.double().cumsum(-1)
    expected = (cdf < u.unsqueeze(-1) * cdf[..., -1:]).sum(-1).clamp(max=96)
    assert torch.equal(estimators.sample_from_probs(probs, u), expected)


@pytest.mark.parametrize(
    ("bad", "named"),
    [({1: float("nan")}, [11]), ({0: float("inf")}, [10]), ({0: float("inf"), 2: float("-inf")}, [10, 12])],
)
def test_non_finite_logits_name_their_examples(bad: dict, named: list) -> None:
    """The one-sum fast path never lets a NaN/Inf through, and the examples named are exactly the bad ones."""
    from fishmerge.errors import FishmergeError
    from fishmerge.fisher.estimators import _check_finite

    logits = torch.randn(3, 5, 7)
    _check_finite(logits, [10, 11, 12])  # finite: passes
    _check_finite(torch.full((2, 3), 3e38), [0, 1])  # finite values whose sum overflows fp32: passes
    for row, value in bad.items():
        logits[row, 2, 3] = value
    with pytest.raises(FishmergeError, match=re.escape(f"example(s) {named} ")):
        _check_finite(logits, [10, 11, 12])
