"""Causal-LM data: prompt/response and chat rows encoded with response-only labels, checked against
tokenization by hand; the Fisher of such data against the naive loop that masks the prompt by hand;
NLL and the output ensemble against plain per-example loops; `auto`/`exact` for LMs."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from fishmerge.errors import FishmergeError
from fishmerge.fisher.engine import estimate_fisher
from fishmerge.fisher.estimators import estimator_for
from fishmerge.io.data import IGNORE_INDEX, encode_lm
from fishmerge.pipeline.evaluation import ensemble_logprobs, lm_metrics, lm_token_logprobs

from tests.conftest import SPECIAL, WORDS
from tests.oracle import naive_fisher
from tests.tiny_models import build
from tests.unit.test_fisher_oracle import assert_close

CHAT_TEMPLATE = "{% for m in messages %}w0 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w0{% endif %}"


def tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)})


def pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": " ".join(rng.choice(WORDS[5:30]) for _ in range(rng.randint(1, 5))),
            "response": " ".join(rng.choice(WORDS[30:]) for _ in range(rng.randint(1, 7))),
        }
        for _ in range(n)
    ]


def by_hand(tok, row: dict, max_length: int) -> tuple[list[int], int]:
    """The SFT layout written out: prompt with special tokens, then the response without them."""
    prompt = tok(row["prompt"])["input_ids"]
    response = tok(row["response"], add_special_tokens=False)["input_ids"]
    return (prompt + response)[:max_length], len(prompt)


def columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_pairs_count_only_response_tokens() -> None:
    tok = tokenizer()
    rows = pairs(9, seed=1)
    enc = encode_lm(columns(rows), tok, ["prompt", "response"], None, 10, range(9))
    for i, row in enumerate(rows):
        ids, start = by_hand(tok, row, 10)
        assert enc.input_ids[i, : len(ids)].tolist() == ids
        assert enc.attention_mask[i].tolist() == [1] * len(ids) + [0] * (enc.input_ids.shape[1] - len(ids))
        want = [IGNORE_INDEX] * start + ids[start:]
        assert enc.labels[i, : len(ids)].tolist() == want
        assert (enc.labels[i, len(ids) :] == IGNORE_INDEX).all()
    assert (enc.labels != IGNORE_INDEX).sum() > 0 and (enc.labels == IGNORE_INDEX).sum() > 0


def test_chat_rows_count_only_the_last_turn() -> None:
    tok = tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    msgs = [[{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w40 w41 w42"}]]
    enc = encode_lm({"messages": msgs}, tok, ["text"], "messages", 32, [0])
    w = {x: i for i, x in enumerate(SPECIAL + WORDS)}
    assert enc.input_ids[0].tolist() == [w["w0"], w["w5"], w["w6"], w["w0"], w["w40"], w["w41"], w["w42"]]
    assert enc.labels[0].tolist() == [IGNORE_INDEX] * 4 + [w["w40"], w["w41"], w["w42"]]
    with pytest.raises(FishmergeError, match="at least two"):
        encode_lm({"messages": [[{"role": "user", "content": "w1"}]]}, tok, ["text"], "messages", 32, [0])
    tok.chat_template = None
    with pytest.raises(FishmergeError, match="no chat template"):
        encode_lm({"messages": msgs}, tok, ["text"], "messages", 32, [0])


@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
def test_fisher_of_responses_equals_the_hand_masked_loop(estimator: str) -> None:
    tok = tokenizer()
    model = build("llama-lm-tied", seed=3).double()
    rows = pairs(7, seed=2)
    enc = encode_lm(columns(rows), tok, ["prompt", "response"], None, 12, list(range(100, 107)))
    ours = estimate_fisher(model, enc.batches(3), estimator, head="causal_lm", seed=5)
    examples = []
    for i, row in enumerate(rows):
        ids, start = by_hand(tok, row, 12)
        examples.append({"input_ids": ids, "id": 100 + i, "response_start": start})
    ref = naive_fisher(model, examples, estimator, "causal_lm", seed=5)
    assert_close(ours, ref, tol=1e-6)
    unmasked = naive_fisher(model, [{**e, "response_start": 0} for e in examples], estimator, "causal_lm", seed=5)
    gap = sum(float((unmasked[k] - ref[k]).abs().sum()) for k in ref)
    assert gap > 1e-3 * sum(float(v.sum()) for v in ref.values())  # the mask matters: the check can fail


def nll_by_hand(model, tok, rows: list[dict], max_length: int) -> tuple[float, list[float]]:
    """Per row, unpadded, batch 1: log p of each response token; NLL = −mean over all of them."""
    values = []
    with torch.no_grad():
        for row in rows:
            ids, start = by_hand(tok, row, max_length)
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            values += [float(logp[t - 1, ids[t]]) for t in range(max(start, 1), len(ids))]
    return -float(np.mean(values)), values


def test_nll_and_ensemble_equal_plain_loops() -> None:
    tok = tokenizer()
    models = [build("llama-lm", seed=s) for s in (4, 5)]
    rows = pairs(11, seed=3)
    got = [lm_token_logprobs(m, tok, rows, ["prompt", "response"], None, 4, 12, progress=False) for m in models]
    for m, values in zip(models, got):
        want_nll, want = nll_by_hand(m, tok, rows, 12)
        np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-6)
        metrics = lm_metrics(values)
        assert metrics["nll"] == pytest.approx(want_nll, rel=1e-6)
        assert metrics["perplexity"] == pytest.approx(math.exp(want_nll), rel=1e-6)
    # the ensemble: the two next-token distributions averaged, read at the true tokens
    pa, pb = (np.exp(nll_by_hand(m, tok, rows, 12)[1]) for m in models)
    want = -float(np.mean(np.log(0.5 * pa + 0.5 * pb)))
    assert lm_metrics(ensemble_logprobs(got, [1, 1]))["nll"] == pytest.approx(want, rel=1e-6)
    assert lm_metrics(ensemble_logprobs(got, [1, 0]))["nll"] == pytest.approx(lm_metrics(got[0])["nll"], rel=1e-9)


def test_auto_estimator_and_exact_for_lms() -> None:
    assert estimator_for("auto", "causal_lm") == "sampled"
    assert estimator_for("auto", "sequence_classification") == "exact"
    assert estimator_for("empirical", "causal_lm") == "empirical"
    with pytest.raises(FishmergeError, match="'exact' over a causal LM's vocabulary is intractable"):
        estimator_for("exact", "causal_lm")


def test_engine_default_estimator_is_auto() -> None:
    from fishmerge.fisher.engine import FisherAccumulator

    with FisherAccumulator(build("llama-lm", seed=1)) as acc:
        assert acc.estimator == "sampled"
    with FisherAccumulator(build("bert-cls", seed=1)) as acc:
        assert acc.estimator == "exact"


def test_non_finite_lm_outputs_are_never_scored() -> None:
    tok = tokenizer()
    model = build("llama-lm", seed=2)
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    first_batch_rows = r"NaN/Inf logits on row\(s\) \[[012](, [012])*\]"
    with pytest.raises(FishmergeError, match=first_batch_rows):
        lm_token_logprobs(model, tok, pairs(3, seed=4), ["prompt", "response"], None, 2, 12, progress=False)
    with pytest.raises(FishmergeError, match="perplexity overflows"):
        lm_metrics(np.array([-800.0]))
    assert lm_metrics(np.array([-800.0]), ["nll"]) == {"nll": 800.0}


def test_pairs_fisher_id_follows_the_tokenizer(tmp_path) -> None:
    """Prompt/response masks depend on the tokenizer (special tokens, chat template): a changed tokenizer is
    another Fisher; plain text keeps the id it always had."""
    import json

    from fishmerge.fisher.job import FisherSpec, resolve

    from tests.conftest import save_model_dir, write_csv

    model = save_model_dir(tmp_path / "lm", "llama-lm")
    data = write_csv(tmp_path / "pairs.csv", pairs(6, seed=5))
    spec = FisherSpec(model=str(model), data=str(data), text_fields=["prompt", "response"], examples=4)
    plain = FisherSpec(model=str(model), data=str(data), text_fields=["response"], examples=4)
    before, before_plain = resolve(spec, None, str(tmp_path / "f")), resolve(plain, None, str(tmp_path / "f"))
    assert before.spec.estimator == "sampled"
    config = tmp_path / "lm" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": CHAT_TEMPLATE}))
    after, after_plain = resolve(spec, None, str(tmp_path / "f")), resolve(plain, None, str(tmp_path / "f"))
    assert after.fisher_id != before.fisher_id
    assert after_plain.fisher_id == before_plain.fisher_id
