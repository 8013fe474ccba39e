"""Scoring with oneDNN's Linear products against each model's own forward (the oracle: PyTorch's own CPU
product, row by row without padding), and the cases that must keep the layer's own forward.

The models are wide enough (hidden 256) that their products pass `MIN_MACS`; the profiler shows which
kernel really ran."""

from __future__ import annotations

import contextlib
import copy
import threading

import numpy as np
import pytest
import torch
import transformers as tf
from fishmerge.forward import onednn_linear
from fishmerge.forward.onednn_linear import MIN_MACS, onednn_linears
from fishmerge.pipeline.evaluation import class_probabilities, perplexity
from torch.profiler import ProfilerActivity, profile

from tests.conftest import SPECIAL, WORDS, sentences
from tests.unit.test_evaluate import oracle_class_probs, oracle_perplexity, word_tokenizer

pytestmark = pytest.mark.skipif(not onednn_linear.available(), reason="this PyTorch has no oneDNN linear op")

WIDE = dict(
    vocab_size=len(SPECIAL + WORDS),
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=64,
    pad_token_id=0,
    initializer_range=0.2,
)
ONEDNN_OP = "mkldnn::_linear_pointwise"


def wide_bert() -> torch.nn.Module:
    """BERT with non-zero biases (its initialiser zeroes them, which would hide a lost bias)."""
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=3, **WIDE)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_(0.0, 0.2)
    return model


def wide_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **WIDE)
    return tf.LlamaForCausalLM(cfg).eval()


def ops_run(fn) -> set[str]:
    """The operator names a call ran (PyTorch's profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_class_probabilities_on_onednn_equal_the_unpadded_loop() -> None:
    model, tok = wide_bert(), word_tokenizer()
    rows = sentences(40, seed=3)
    got: list[np.ndarray] = []
    ran = ops_run(lambda: got.append(class_probabilities(model, tok, rows, ["text"], 16, 32, progress=False)))
    assert ONEDNN_OP in ran  # the wide products really went to oneDNN
    own = oracle_class_probs(model, tok, rows, ["text"])  # outside the context: PyTorch's own fp32 product
    exact = oracle_class_probs(copy.deepcopy(model).double(), tok, rows, ["text"])
    # fp32 rounding: PyTorch's own fp32 forward is 4e-6 off exact arithmetic here, oneDNN's 1e-5 (summation
    # order); a lost bias or a wrong weight moves probabilities by 1e-2 and more
    assert np.abs(own - exact).max() < 3e-5
    np.testing.assert_allclose(got[0], exact, atol=3e-5, rtol=0)
    assert np.ptp(got[0][:, 0]) > 1e-3  # rows really differ: the check is not vacuous
    assert "forward" not in model.bert.encoder.layer[0].intermediate.dense.__dict__  # put back


def test_perplexity_on_onednn_equals_the_unpadded_loop() -> None:
    model, tok = wide_llama(), word_tokenizer()
    texts = [r["text"] for r in sentences(24, seed=4)]
    got: list[float] = []
    ran = ops_run(lambda: got.append(perplexity(model, tok, texts, batch_size=8, max_length=20, progress=False)))
    assert ONEDNN_OP in ran
    assert got[0] == pytest.approx(oracle_perplexity(model, tok, texts, max_length=20), rel=1e-5)


def test_logits_within_rounding_of_the_float64_forward() -> None:
    """oneDNN's fp32 product is as close to exact arithmetic as PyTorch's own (the same order of error)."""
    model = wide_bert()
    ids = torch.randint(5, 95, (16, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact = model.double()(input_ids=ids).logits
        model.float()
        own = model(input_ids=ids).logits.double()
        with onednn_linears(model) as on:
            fast = model(input_ids=ids).logits.double()
    assert on
    own_err, fast_err = float((own - exact).abs().max()), float((fast - exact).abs().max())
    assert fast_err <= max(8 * own_err, 1e-5), (fast_err, own_err)
    assert float((fast - own).abs().max()) > 0 or own_err == 0  # a different kernel really ran


def test_autograd_small_products_and_other_dtypes_keep_the_own_forward() -> None:
    model = wide_bert()
    big = torch.randint(5, 95, (16, 30))
    small = torch.randint(5, 95, (1, 4))  # 4 rows × 256 × 256 < MIN_MACS
    assert 4 * 256 * 256 < MIN_MACS <= 16 * 30 * 256 * 256
    with onednn_linears(model):
        with torch.enable_grad():
            grad_ops = ops_run(lambda: model(input_ids=big).logits.sum().backward())
        with torch.inference_mode():
            small_ops = ops_run(lambda: model(input_ids=small))
            model.double()
            double_ops = ops_run(lambda: model(input_ids=big))
            model.float()
            fast_ops = ops_run(lambda: model(input_ids=big))
    assert ONEDNN_OP not in grad_ops and ONEDNN_OP not in small_ops and ONEDNN_OP not in double_ops
    assert ONEDNN_OP in fast_ops
    assert model.bert.encoder.layer[0].output.dense.weight.grad is not None  # training still works inside


def test_put_back_after_an_error_and_with_two_threads() -> None:
    model = wide_bert()
    dense = model.bert.encoder.layer[0].output.dense
    with pytest.raises(RuntimeError, match="boom"), onednn_linears(model):
        assert "forward" in dense.__dict__
        raise RuntimeError("boom")
    assert "forward" not in dense.__dict__

    inside, leave = threading.Barrier(2), threading.Event()
    seen = []

    def user(wait: bool) -> None:
        with onednn_linears(model):
            inside.wait()
            if wait:
                leave.wait()
            seen.append("forward" in dense.__dict__)

    first = threading.Thread(target=user, args=(True,))
    first.start()
    user(False)  # leaves first: the other thread is still inside, so the swap stays
    still_swapped = "forward" in dense.__dict__
    leave.set()
    first.join()
    assert seen == [True, True] and still_swapped
    assert "forward" not in dense.__dict__


def test_a_forward_replaced_by_someone_else_is_left_alone() -> None:
    model = wide_bert()
    dense = model.bert.encoder.layer[0].output.dense
    calls = []

    def theirs(x):
        calls.append(1)
        return torch.nn.functional.linear(x, dense.weight, dense.bias)

    dense.forward = theirs  # e.g. accelerate's offloading hooks replace a module's forward
    with torch.inference_mode(), onednn_linears(model):
        model(input_ids=torch.randint(5, 95, (16, 30)))
    assert calls and dense.forward is theirs


def wide_examples(n: int, seed: int) -> list[dict]:
    """Rows of 18–30 tokens with labels: batches of 16 pass MIN_MACS in the wide models' layers."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(18, 31, (1,), generator=g))
        ids = torch.randint(5, WIDE["vocab_size"], (length,), generator=g).tolist()
        label = int(torch.randint(0, 3, (1,), generator=g))
        out.append({"id": 7 + i, "input_ids": ids, "label": label, "labels": [0] * length})
    return out


@pytest.mark.parametrize(
    ("build", "estimator"), [(wide_bert, "exact"), (wide_bert, "empirical"), (wide_llama, "sampled")]
)
def test_fisher_on_onednn_equals_the_naive_oracle(build, estimator) -> None:
    """The first batch checks the rules against autograd's weight gradients on PyTorch's own products; the
    second runs forward and input backward on oneDNN. The oracle: batch 1, unpadded, autograd's parameter
    gradients, no oneDNN (tests/oracle.py)."""
    from fishmerge.fisher.engine import estimate_fisher
    from fishmerge.fisher.estimators import detect_head

    from tests.oracle import naive_fisher
    from tests.unit.test_fisher_oracle import assert_close, make_batches

    model = build()
    examples = wide_examples(32, seed=2)
    got = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got.append(estimate_fisher(model, make_batches(model, examples, 16), estimator, seed=5))
    ran = {e.key: e.count for e in prof.key_averages()}
    assert ran.get(ONEDNN_OP, 0) > 0
    assert any("_InputGradProductBackward" in k for k in ran)  # the backward to the inputs ran on oneDNN too
    ref = naive_fisher(model, examples, estimator, detect_head(model), seed=5)
    assert_close(got[0], ref, tol=1e-4)


def _input_grad(model: torch.nn.Module, ids: torch.Tensor, fast: bool):
    """d(Σ logits²)/d(input of layer 0's intermediate product), the logits and that layer's output."""
    seen = {}
    dense = model.bert.encoder.layer[0].intermediate.dense
    hook = dense.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with onednn_linears(model, input_grads_only=True) if fast else contextlib.nullcontext():
        logits = model(input_ids=ids).logits
    hook.remove()
    grad = torch.autograd.grad(logits.square().sum(), seen["x"], retain_graph=True)[0].double()
    return grad, logits, seen["y"]


def test_input_grads_only_reaches_inputs_not_weights() -> None:
    model = wide_bert()
    ids = torch.randint(5, 95, (16, 30), generator=torch.Generator().manual_seed(3))
    exact, _, _ = _input_grad(copy.deepcopy(model).double(), ids, fast=False)
    own, _, _ = _input_grad(model, ids, fast=False)
    got, logits, out = _input_grad(model, ids, fast=True)
    own_err, got_err = float((own - exact).norm()), float((got - exact).norm())
    assert got_err <= 3 * own_err, (got_err, own_err)  # fp32 rounding, as PyTorch's own (1.5e-5 relative here)
    assert "InputGradProduct" in type(out.grad_fn).__name__  # the product and its backward were oneDNN's
    dense = model.bert.encoder.layer[0].intermediate.dense
    assert torch.autograd.grad(logits.sum(), dense.weight, allow_unused=True)[0] is None  # the weight gets none


def test_greedy_generation_on_onednn_equals_the_own_forward() -> None:
    """One row a step: only the LM head (20 000 × 256 = 5 M multiply-adds) passes MIN_MACS."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **{**WIDE, "vocab_size": 20_000})
    model = tf.LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(5, 20_000, (1, 7), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        want = model.generate(prompt, **kw)
        with onednn_linears(model):
            got: list[torch.Tensor] = []
            ran = ops_run(lambda: got.append(model.generate(prompt, **kw)))
    assert ONEDNN_OP in ran
    assert torch.equal(got[0], want)
    assert len(set(want[0, 7:].tolist())) > 1  # the continuation is not one token repeated


def test_backward_to_the_input_runs_on_onednn() -> None:
    model = wide_bert()
    ids = torch.randint(5, 95, (16, 30), generator=torch.Generator().manual_seed(4))
    with onednn_linears(model, input_grads_only=True):
        hidden = model.bert.embeddings(input_ids=ids)
        out = model.bert.encoder.layer[0](hidden)
        out = out[0] if isinstance(out, tuple) else out
    backward_ops = ops_run(lambda: torch.autograd.grad(out.square().sum(), hidden))
    assert ONEDNN_OP in backward_ops


def test_a_non_contiguous_input_reaches_onednn() -> None:
    """As the first-position layer's query: one position of every row, a strided view."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(256, 256)
    x = torch.randn(80, 7, 256)[:, :1]  # 80 × 256 × 256 multiply-adds ≥ MIN_MACS
    assert not x.is_contiguous() and x.numel() * 256 >= MIN_MACS
    with torch.inference_mode(), onednn_linears(lin):
        got: list[torch.Tensor] = []
        ran = ops_run(lambda: got.append(lin(x)))
    assert ONEDNN_OP in ran
    torch.testing.assert_close(got[0], torch.nn.functional.linear(x, lin.weight, lin.bias), atol=2e-5, rtol=1e-5)


def test_an_input_without_gradient_keeps_its_weight_gradient() -> None:
    """Under input_grads_only, a Linear fed by a tensor that needs no gradient (frozen embeddings, raw
    features) still runs its own forward: its output's gradient comes through its weight."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(256, 256)
    x = torch.randn(64, 256)  # 4.2 M multiply-adds: large enough, but no gradient to give
    with onednn_linears(lin, input_grads_only=True):
        y = lin(x)
    assert y.requires_grad
    (gw,) = torch.autograd.grad(y.sum(), lin.weight)
    torch.testing.assert_close(gw, x.sum(0).expand(256, 256), atol=1e-4, rtol=1e-5)


def test_input_grads_only_is_restored_after_an_error_and_stays_in_its_thread() -> None:
    model = wide_bert()
    ids = torch.randint(5, 95, (16, 30), generator=torch.Generator().manual_seed(6))
    dense = model.bert.encoder.layer[0].output.dense

    def trains() -> bool:
        """A training step's weight gradient reaches the layer (PyTorch's own product, not oneDNN's)."""
        model.zero_grad()
        with torch.enable_grad():
            model(input_ids=ids).logits.sum().backward()
        return dense.weight.grad is not None and bool(dense.weight.grad.abs().sum() > 0)

    with onednn_linears(model):  # an outer caller without input_grads_only
        with pytest.raises(RuntimeError, match="boom"), onednn_linears(model, input_grads_only=True):
            raise RuntimeError("boom")
        assert trains()  # the outer caller's setting is back

    inside, leave = threading.Event(), threading.Event()

    def estimator() -> None:
        with onednn_linears(model, input_grads_only=True):
            inside.set()
            leave.wait(timeout=30)

    other = threading.Thread(target=estimator)
    other.start()
    try:
        assert inside.wait(timeout=30)
        with onednn_linears(model):
            assert trains()  # the other thread's input_grads_only does not reach this one
    finally:
        leave.set()
        other.join()
