"""Log-likelihood terms whose per-example gradients, squared and summed, give the Fisher.

Each estimator yields a list of scalar terms; for each term the engine takes one backward pass,
and example n's gradient of that term is the quantity to square:
- `empirical`: log p(y|x) at the true label (classification) or next tokens (LM);
- `sampled`: log p(ŷ|x) with ŷ drawn from the model (LMs: one draw per position, the sequence's
  log-likelihood summed over positions, so the square is per sequence);
- `exact`: one term per class c, Σₙ √p(c|xₙ) log p(c|xₙ) with √p detached, so the squared
  per-example gradient is p(c|x)(∇log p(c|x))² and the terms sum to the expectation over classes.
Regression heads (one output) use a unit-variance Gaussian likelihood.
Draws come from a generator seeded by (seed, example id, position within the real tokens), so
an example's draw does not depend on batching, padding side or sharding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fishmerge.errors import FishmergeError

ESTIMATORS = ("exact", "sampled", "empirical")
HEADS = ("sequence_classification", "causal_lm", "token_classification")
IGNORE_INDEX = -100


def detect_head(model: nn.Module | str) -> str:
    """Which likelihood a Hugging Face model (or architecture class name) defines."""
    name = model if isinstance(model, str) else type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    if name.endswith("ForTokenClassification"):
        return "token_classification"
    raise FishmergeError(
        f"cannot tell which likelihood {name} defines: fishmerge supports *ForSequenceClassification, "
        "*ForCausalLM / *LMHeadModel and *ForTokenClassification models. Pass head= explicitly if the "
        "model's logits follow one of those layouts."
    )


def example_noise(seed: int, example_ids: Sequence[int], length: int, kind: str = "uniform") -> torch.Tensor:
    """(n, length) fp64 draws; row n depends only on (seed, example_ids[n]) and is prefix-stable."""
    rows = []
    for eid in example_ids:
        rng = np.random.default_rng([int(seed), int(eid)])
        rows.append(rng.random(length) if kind == "uniform" else rng.standard_normal(length))
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, length, dtype=torch.float64)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of a class per row of `probs` (…, C) from uniforms (…): device-independent."""
    cdf = probs.double().cumsum(-1)
    u = uniforms.to(cdf.device, torch.float64).unsqueeze(-1) * cdf[..., -1:]
    return (cdf < u).sum(-1).clamp(max=probs.shape[-1] - 1)


def _check_finite(logits: torch.Tensor, example_ids: Sequence[int]) -> None:
    bad = ~torch.isfinite(logits.detach()).reshape(logits.shape[0], -1).all(1)
    if bool(bad.any()):
        ids = [int(example_ids[i]) for i in torch.nonzero(bad).flatten().tolist()]
        raise FishmergeError(
            f"the model produced NaN/Inf logits for example(s) {ids[:10]} (dataset row index): check the "
            "model weights and dtype (fp16 overflows are common; try --dtype float32)."
        )


def _check_labels(labels: torch.Tensor, num_labels: int, example_ids: Sequence[int]) -> None:
    flat = labels.reshape(labels.shape[0], -1)
    bad = ((flat != IGNORE_INDEX) & ((flat < 0) | (flat >= num_labels))).any(1)
    if bool(bad.any()):
        i = int(torch.nonzero(bad).flatten()[0])
        vals = sorted({int(v) for v in flat[i].tolist() if v != IGNORE_INDEX and not 0 <= v < num_labels})
        raise FishmergeError(
            f"label(s) {vals} of example {int(example_ids[i])} are outside [0, {num_labels}) for a model with "
            f"num_labels={num_labels}: check --label-field, or that the model was fine-tuned on this task."
        )


def _real_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def log_likelihood_terms(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    head: str,
    estimator: str,
    seed: int,
    example_ids: Sequence[int],
    max_exact_classes: int = 64,
) -> list[torch.Tensor]:
    """The scalar terms to backpropagate, one backward each (see module docstring)."""
    if estimator not in ESTIMATORS:
        raise FishmergeError(f"unknown estimator '{estimator}': choose one of {', '.join(ESTIMATORS)}")
    _check_finite(logits, example_ids)
    if head == "sequence_classification":
        return _sequence_terms(logits, batch, estimator, seed, example_ids, max_exact_classes)
    if head == "causal_lm":
        return _causal_lm_terms(logits, batch, estimator, seed, example_ids)
    if head == "token_classification":
        return _token_terms(logits, batch, estimator, seed, example_ids)
    raise FishmergeError(f"unknown head '{head}': choose one of {', '.join(HEADS)}")


def _need_labels(batch: dict, estimator: str) -> torch.Tensor:
    if "labels" not in batch:
        raise FishmergeError(f"the '{estimator}' estimator needs true labels: give the data a label column")
    return batch["labels"]


def _sequence_terms(logits, batch, estimator, seed, example_ids, max_exact_classes):
    n, c = logits.shape[0], logits.shape[-1]
    if c == 1:  # regression: log N(y; μ, 1), ∇ = (y − μ)∇μ
        mu = logits.reshape(n).float()
        if estimator == "exact":  # E[(y − μ)²] = 1
            return [mu.sum()]
        if estimator == "sampled":
            y = mu.detach() + example_noise(seed, example_ids, 1, "normal")[:, 0].to(mu)
        else:
            y = _need_labels(batch, estimator).reshape(n).to(mu)
        return [(-0.5 * (y - mu).square()).sum()]
    logp = logits.float().log_softmax(-1)
    if estimator == "exact":
        if c > max_exact_classes:
            raise FishmergeError(
                f"'exact' needs one backward pass per class and this head has {c} classes "
                f"(limit {max_exact_classes}): use --estimator sampled."
            )
        sqrt_p = logp.detach().exp().sqrt()
        return [(sqrt_p[:, k] * logp[:, k]).sum() for k in range(c)]
    if estimator == "sampled":
        y = sample_from_probs(logp.detach().exp(), example_noise(seed, example_ids, 1)[:, 0])
    else:
        y = _need_labels(batch, estimator).reshape(n).to(logp.device).long()
        _check_labels(y, c, example_ids)
    return [logp.gather(1, y.unsqueeze(1)).sum()]


def _causal_lm_terms(logits, batch, estimator, seed, example_ids):
    if estimator == "exact":
        raise FishmergeError(
            f"'exact' over a vocabulary of {logits.shape[-1]} tokens is intractable for a causal LM: "
            "use --estimator sampled (or empirical)."
        )
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    valid = mask[:, :-1] & mask[:, 1:]  # predict a real token from a real token
    logp = logits[:, :-1].float().log_softmax(-1)
    if estimator == "empirical":
        y = ids[:, 1:]
    else:
        t = ids.shape[1]
        u = example_noise(seed, example_ids, t).gather(1, _real_positions(mask).cpu())[:, :-1]
        y = sample_from_probs(logp.detach().exp(), u)
    picked = logp.gather(-1, y.unsqueeze(-1).to(logp.device)).squeeze(-1)
    return [(picked * valid).sum()]


def _token_terms(logits, batch, estimator, seed, example_ids):
    if estimator == "exact":
        raise FishmergeError(
            "'exact' for token classification needs per-token squares, not per-sequence ones: "
            "use --estimator sampled (or empirical)."
        )
    c = logits.shape[-1]
    mask = batch.get("attention_mask", torch.ones(logits.shape[:2], dtype=torch.long)).bool().to(logits.device)
    logp = logits.float().log_softmax(-1)
    if estimator == "empirical":
        y = _need_labels(batch, estimator).to(logits.device).long()
        _check_labels(y, c, example_ids)
        valid = (y != IGNORE_INDEX) & mask
        y = y.clamp(min=0)
    else:
        labels = batch.get("labels")
        valid = mask if labels is None else mask & (labels.to(mask.device) != IGNORE_INDEX)
        u = example_noise(seed, example_ids, logits.shape[1]).gather(1, _real_positions(mask).cpu())
        y = sample_from_probs(logp.detach().exp(), u)
    picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return [(picked * valid).sum()]
