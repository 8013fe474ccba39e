"""The first-position last layer against each model's own full forward (the oracle), per architecture and
attention kernel, on padded batches."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from fishmerge.forward.first_position import FirstPositionLayer, first_position_only

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=48,
    initializer_range=0.3,
    num_labels=3,
)

ARCHS = {
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(pad_token_id=0, **SMALL)),
    "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(pad_token_id=1, **SMALL)),
    "xlm-roberta": lambda: tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(pad_token_id=1, **SMALL)),
    "camembert": lambda: tf.CamembertForSequenceClassification(tf.CamembertConfig(pad_token_id=1, **SMALL)),
    "electra": lambda: tf.ElectraForSequenceClassification(
        tf.ElectraConfig(pad_token_id=0, embedding_size=16, **SMALL)
    ),
}


def padded_batch(pad: int, seed: int = 0) -> dict:
    """Five rows of lengths 3..40 right-padded to 40, pairs' token types set on the second half."""
    g = torch.Generator().manual_seed(seed)
    lengths = [40, 3, 17, 9, 25]
    ids = torch.full((5, 40), pad, dtype=torch.long)
    mask = torch.zeros(5, 40, dtype=torch.long)
    types = torch.zeros(5, 40, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 97, (n,), generator=g)
        mask[i, :n] = 1
        types[i, n // 2 : n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def build(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ARCHS[arch]()
    model.config._attn_implementation = attn
    return model.eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_first_position_equals_the_full_forward(arch, attn) -> None:
    model = build(arch, attn)
    batch = padded_batch(model.config.pad_token_id)
    seen = []
    last = model.base_model.encoder.layer[-1]
    hook = last.intermediate.dense.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.inference_mode():
        want = model(**batch).logits
        with first_position_only(model) as on:
            assert on
            assert isinstance(model.base_model.encoder.layer[-1], FirstPositionLayer)
            got = model(**batch).logits
    hook.remove()
    assert seen == [(5, 40, 32), (5, 1, 32)]  # the feed-forward really ran on one position the second time
    assert model.base_model.encoder.layer[-1] is last  # put back
    assert want.abs().max() > 0.1 and want[:, 0].std() > 1e-3  # rows differ: the comparison is not vacuous
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_unpadded_batch_and_a_single_row() -> None:
    """No padding (SDPA then gets no mask) and a batch of one row."""
    model = build("bert", "sdpa")
    batch = {k: v[:1] for k, v in padded_batch(0).items()}  # the 40-token row, no padding
    with torch.inference_mode():
        want = model(**batch).logits
        with first_position_only(model):
            got = model(**batch).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_other_models_and_training_mode_run_their_own_forward() -> None:
    distil = tf.DistilBertForSequenceClassification(
        tf.DistilBertConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=48)
    ).eval()
    with first_position_only(distil) as on:
        assert not on
    bert = build("bert", "sdpa").train()
    with first_position_only(bert) as on:
        assert not on
        assert not isinstance(bert.base_model.encoder.layer[-1], FirstPositionLayer)
    token_cls = tf.BertForTokenClassification(tf.BertConfig(pad_token_id=0, **SMALL)).eval()
    with first_position_only(token_cls) as on:  # reads every position: never cut
        assert not on


def test_the_layer_is_put_back_after_an_error() -> None:
    model = build("roberta", "eager")
    last = model.base_model.encoder.layer[-1]
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"), first_position_only(model):
        raise RuntimeError("boom")
    assert model.base_model.encoder.layer[-1] is last
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize(("statistics", "rows_seen"), [(("fisher",), 1), (("fisher", "gram"), 40)])
def test_fisher_estimation_cuts_the_last_layer_unless_grams_are_asked(statistics, rows_seen) -> None:
    """The Fisher's values are checked against the naive full-forward oracle in test_fisher_oracle.py; here,
    that the estimation really runs the cut layer (Grams read every token's input, so they keep it whole)."""
    from fishmerge.fisher.engine import FisherAccumulator

    model = build("bert", "sdpa")
    batch = padded_batch(0) | {"labels": torch.tensor([0, 1, 2, 0, 1])}
    seen = []
    hook = model.base_model.encoder.layer[-1].intermediate.dense.register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape[1])
    )
    with FisherAccumulator(model, "exact", statistics=statistics) as acc:
        acc.add_batch(batch, list(range(5)))
    hook.remove()
    assert seen == [rows_seen]
    assert not isinstance(model.base_model.encoder.layer[-1], FirstPositionLayer)
    assert float(acc.fisher()["bert.encoder.layer.2.intermediate.dense.weight"].sum()) > 0


def test_one_model_in_two_threads_is_put_back_when_the_last_leaves() -> None:
    """Two callers inside at once on one model (a caller's own threads): the layer is cut once, stays cut
    while either is inside, and is whole again after both, whichever leaves first."""
    import threading

    model = build("bert", "sdpa")
    last = model.base_model.encoder.layer[-1]
    batch = padded_batch(0)
    with torch.inference_mode():
        want = model(**batch).logits
    inside, first_out, results = threading.Barrier(2), threading.Event(), {}

    def caller(name: str) -> None:
        with torch.inference_mode(), first_position_only(model) as on:
            inside.wait()
            if name == "b":
                first_out.wait()  # "a" has left: "b" still sees the cut layer
            results[name] = (on, type(model.base_model.encoder.layer[-1]), model(**batch).logits)
        if name == "a":
            first_out.set()

    threads = [threading.Thread(target=caller, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for on, layer_type, got in results.values():
        assert on and layer_type is FirstPositionLayer
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert model.base_model.encoder.layer[-1] is last
    assert not isinstance(last, FirstPositionLayer)


def test_not_cut_when_the_full_forward_would_differ() -> None:
    """Hidden states or attentions asked for by the config; a submodule left in training mode (its dropout
    would run); a class that only shares transformers' name."""
    hidden = build("bert", "sdpa")
    hidden.config.output_hidden_states = True
    attentions = build("roberta", "eager")
    attentions.config.output_attentions = True
    dropout_on = build("bert", "sdpa")
    dropout_on.base_model.encoder.layer[-1].output.dropout.train()
    impostor_type = type("BertForSequenceClassification", (tf.BertForSequenceClassification,), {})
    impostor_type.__module__ = "someones_remote_code"
    torch.manual_seed(0)
    impostor = impostor_type(tf.BertConfig(pad_token_id=0, **SMALL)).eval()
    for model in (hidden, attentions, dropout_on, impostor):
        with first_position_only(model) as on:
            assert not on
            assert not isinstance(model.base_model.encoder.layer[-1], FirstPositionLayer)
