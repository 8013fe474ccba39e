"""Log-likelihood terms whose per-example gradients, squared and summed, give the Fisher.

Each estimator yields a list of scalar terms; for each term the engine takes one backward pass,
and example n's gradient of that term is the quantity to square:
- `empirical`: log p(y|x) at the true label (classification) or next tokens (LM);
- `sampled`: log p(ŷ|x) with ŷ drawn from the model (LMs: one draw per position, the sequence's
  log-likelihood summed over positions, so the square is per sequence);
- `exact`: the expectation over classes Σ_c p(c|x)(∇log p(c|x))², from C − 1 terms Σₙ u_k(xₙ)·log p(·|xₙ)
  whose weights u_k (detached) factor the softmax covariance diag(p) − p pᵀ (`covariance_roots`): one
  backward pass fewer than one term per class, half as many for a binary head.
Regression heads (one output) use a unit-variance Gaussian likelihood.
Draws come from a generator seeded by (seed, example id, position within the real tokens), so
an example's draw does not depend on batching, padding side or sharding.

The estimators are a registry: a subclass of `Estimator` decorated with `@register` is all a new
one needs. Everything else (the `fishmerge fisher --estimator` choices, the config's `fisher:
estimator`, whether the data must have labels) reads `ESTIMATORS` and `get_estimator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fishmerge.errors import FishmergeError
from fishmerge.io.data import IGNORE_INDEX

HEADS = ("sequence_classification", "causal_lm", "token_classification")


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


# Bytes of fp64 CDF rows formed at once: cache-sized on CPU (not a whole (n, T, V) fp64 tensor), larger on GPUs.
CDF_CHUNK_BYTES = {"cpu": 4 * 2**20}
CDF_CHUNK_BYTES_OTHER = 256 * 2**20


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of a class per row of `probs` (…, C) from uniforms (…): device-independent.

    The index is #{c : cdf[c] < u · cdf[-1]} with the fp64 sequential cumulative sum. The CDF is
    built a few rows at a time and searched with searchsorted (it is non-decreasing, so that count
    is the left insertion point): the same draws as one (…, C) fp64 cumsum, ~15x faster on a
    vocabulary, whose fp64 copy and cumsum otherwise cost as much memory traffic as a layer.
    """
    c = probs.shape[-1]
    flat = probs.reshape(-1, c)
    u = uniforms.reshape(-1, 1).to(probs.device, torch.float64)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=probs.device)
    rows = max(1, CDF_CHUNK_BYTES.get(probs.device.type, CDF_CHUNK_BYTES_OTHER) // (8 * c))
    for s in range(0, flat.shape[0], rows):
        cdf = flat[s : s + rows].cumsum(-1, dtype=torch.float64)
        out[s : s + rows] = torch.searchsorted(cdf, u[s : s + rows] * cdf[:, -1:]).squeeze(-1)
    return out.clamp_(max=c - 1).view(probs.shape[:-1])


def _check_finite(logits: torch.Tensor, example_ids: Sequence[int]) -> None:
    """Refuse NaN/Inf logits, naming the examples. One sum decides the common case (NaN and Inf
    propagate through it; an LM's logits make a full isfinite pass cost ~3 % of a batch); only a
    non-finite sum (which large finite values can also give) looks at every example."""
    if bool(torch.isfinite(logits.detach().sum(dtype=torch.float64))):
        return
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


@dataclass(frozen=True)
class Draws:
    """What an estimator may use besides the model's outputs: the batch, and the seed and dataset row
    ids that its random draws depend on."""

    batch: dict[str, torch.Tensor]
    seed: int
    example_ids: Sequence[int]
    max_exact_classes: int = 64

    def labels(self, estimator: str) -> torch.Tensor:
        if "labels" not in self.batch:
            raise FishmergeError(f"the '{estimator}' estimator needs true labels: give the data a label column")
        return self.batch["labels"]

    def uniforms(self, length: int) -> torch.Tensor:
        return example_noise(self.seed, self.example_ids, length)


class Estimator:
    """How the label y of log p(y|x) is chosen, for each kind of head. Subclass, set the class
    attributes, implement the four methods and decorate with `@register`."""

    name: str
    description: str  # one line, shown by `fishmerge fisher --help`
    uses_labels: bool = False  # needs the data's label column (causal LMs predict their own tokens)

    def classification(self, logp: torch.Tensor, d: Draws) -> list[torch.Tensor]:
        """Terms for a classification head: logp (n, C) log-probabilities, C > 1."""
        raise NotImplementedError

    def regression(self, mu: torch.Tensor, d: Draws) -> list[torch.Tensor]:
        """Terms for a one-output regression head (unit-variance Gaussian around mu (n,))."""
        raise NotImplementedError

    def next_tokens(self, logp: torch.Tensor, mask: torch.Tensor, d: Draws) -> torch.Tensor:
        """A causal LM's target tokens (n, T-1) for logp (n, T-1, V) of positions 0…T-2."""
        raise NotImplementedError

    def token_labels(self, logp: torch.Tensor, mask: torch.Tensor, d: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """A token-classification head's (labels (n, T), valid positions (n, T))."""
        raise NotImplementedError


_REGISTRY: dict[str, Estimator] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Add an estimator to the registry (in definition order: the first is the default)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"estimator '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_estimator(name: str) -> Estimator:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise FishmergeError(f"unknown estimator '{name}': choose one of {', '.join(_REGISTRY)}") from None


def covariance_roots(logp: torch.Tensor) -> list[torch.Tensor]:
    """C − 1 detached weights u_k (n, C) with Σ_k u_k u_kᵀ = diag(p) − p pᵀ per example, p = exp(logp).

    Σ_c p_c (∇log p_c)² = diag(Jᵀ (diag p − p pᵀ) J) for J the logits' Jacobian. The softmax covariance
    factors class by class (is it class k, given it is one of k…C−1?): with tail sums s_k = Σ_{j≥k} p_j,
    u_k = √(p_k s_{k+1} / s_k) · (e_k − [p_j / s_{k+1}]_{j>k}). Each u_k sums to zero, so
    ∇(u_k · log p) = Jᵀu_k, and Σ_k (Jᵀu_k)² is the expectation over the classes: C − 1 backward passes
    instead of one per class (a binary head needs one). Computed in fp64 on the CPU; exact for a
    confident head too (no eigen-solver that cannot tell its small directions apart).
    """
    p = logp.to("cpu", torch.float64).exp()
    tail = p.flip(-1).cumsum(-1).flip(-1)  # s_k
    below = tail.clamp(min=1e-300)  # as denominators: where a tail sum is 0, so is every numerator over it
    roots = []
    for k in range(p.shape[-1] - 1):
        coef = (p[:, k] * tail[:, k + 1] / below[:, k]).sqrt()
        u = torch.zeros_like(p)
        u[:, k] = coef
        u[:, k + 1 :] = -(coef / below[:, k + 1])[:, None] * p[:, k + 1 :]
        roots.append(u.to(logp.device, logp.dtype))
    return roots


def _gaussian(mu: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [(-0.5 * (y - mu).square()).sum()]


def _picked(logp: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [logp.gather(1, y.unsqueeze(1)).sum()]


@register
class Exact(Estimator):
    name = "exact"
    description = "expectation over the classes"

    def classification(self, logp, d):
        c = logp.shape[-1]
        if c > d.max_exact_classes:
            raise FishmergeError(
                f"'exact' needs one backward pass per class but one, and this head has {c} classes "
                f"(limit {d.max_exact_classes}): use --estimator sampled."
            )
        return [(u * logp).sum() for u in covariance_roots(logp.detach())]

    def regression(self, mu, d):  # E[(y − μ)²] = 1
        return [mu.sum()]

    def next_tokens(self, logp, mask, d):
        raise FishmergeError(
            f"'exact' over a vocabulary of {logp.shape[-1]} tokens is intractable for a causal LM: "
            "use --estimator sampled (or empirical)."
        )

    def token_labels(self, logp, mask, d):
        raise FishmergeError(
            "'exact' for token classification needs per-token squares, not per-sequence ones: "
            "use --estimator sampled (or empirical)."
        )


@register
class Sampled(Estimator):
    name = "sampled"
    description = "one label drawn from the model"

    def classification(self, logp, d):
        return _picked(logp, sample_from_probs(logp.detach().exp(), d.uniforms(1)[:, 0]))

    def regression(self, mu, d):
        noise = example_noise(d.seed, d.example_ids, 1, "normal")[:, 0].to(mu)
        return _gaussian(mu, mu.detach() + noise)

    def next_tokens(self, logp, mask, d):
        u = d.uniforms(mask.shape[1]).gather(1, _real_positions(mask).cpu())[:, :-1]
        return sample_from_probs(logp.detach().exp(), u)

    def token_labels(self, logp, mask, d):
        labels = d.batch.get("labels")
        valid = mask if labels is None else mask & (labels.to(mask.device) != IGNORE_INDEX)
        u = d.uniforms(logp.shape[1]).gather(1, _real_positions(mask).cpu())
        return sample_from_probs(logp.detach().exp(), u), valid


@register
class Empirical(Estimator):
    name = "empirical"
    description = "the data's label"
    uses_labels = True

    def classification(self, logp, d):
        y = d.labels(self.name).reshape(logp.shape[0]).to(logp.device).long()
        _check_labels(y, logp.shape[-1], d.example_ids)
        return _picked(logp, y)

    def regression(self, mu, d):
        return _gaussian(mu, d.labels(self.name).reshape(mu.shape[0]).to(mu))

    def next_tokens(self, logp, mask, d):
        return d.batch["input_ids"][:, 1:]

    def token_labels(self, logp, mask, d):
        y = d.labels(self.name).to(logp.device).long()
        _check_labels(y, logp.shape[-1], d.example_ids)
        return y.clamp(min=0), (y != IGNORE_INDEX) & mask


ESTIMATORS = tuple(_REGISTRY)  # names in registration order
AUTO = "auto"  # the default: `exact` for classifiers, `sampled` for causal LMs (a vocabulary is too big for exact)
DEFAULT_ESTIMATOR = AUTO


def estimator_for(name: str, head: str) -> str:
    """The estimator `name` stands for on a model with this head (`auto` resolved), refused up front where
    it cannot work (`exact` on a causal LM: one backward pass per vocabulary entry)."""
    if name == AUTO:
        return "sampled" if head in ("causal_lm", "token_classification") else ESTIMATORS[0]
    get_estimator(name)
    if name == "exact" and head == "causal_lm":
        raise FishmergeError(
            "'exact' over a causal LM's vocabulary is intractable (one backward pass per token of the vocabulary): "
            "use --estimator sampled (in a config fisher.estimator: sampled; the default for causal LMs) or empirical"
        )
    return name


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
    est = get_estimator(estimator_for(estimator, head))
    _check_finite(logits, example_ids)
    d = Draws(batch, seed, example_ids, max_exact_classes)
    if head == "sequence_classification":
        n, c = logits.shape[0], logits.shape[-1]
        if c == 1:  # regression: log N(y; μ, 1), ∇ = (y − μ)∇μ
            return est.regression(logits.reshape(n).float(), d)
        return est.classification(logits.float().log_softmax(-1), d)
    if head == "causal_lm":
        return _causal_lm_terms(logits, est, d)
    if head == "token_classification":
        return _token_terms(logits, est, d)
    raise FishmergeError(f"unknown head '{head}': choose one of {', '.join(HEADS)}")


def _causal_lm_terms(logits, est: Estimator, d: Draws):
    ids = d.batch["input_ids"]
    mask = d.batch.get("attention_mask", torch.ones_like(ids)).bool()
    valid = mask[:, :-1] & mask[:, 1:]  # predict a real token from a real token
    if "labels" in d.batch:  # prompt/response data: only the response tokens count (labels −100 elsewhere)
        if d.batch["labels"].shape != ids.shape:
            raise FishmergeError(
                f"a causal LM's labels mark the tokens that count, one per token {tuple(ids.shape)}, got shape "
                f"{tuple(d.batch['labels'].shape)}: drop the label column (an LM predicts its own tokens)"
            )
        valid = valid & (d.batch["labels"][:, 1:].to(valid.device) != IGNORE_INDEX)
    logp = logits[:, :-1].float().log_softmax(-1)
    y = est.next_tokens(logp, mask, d)
    picked = logp.gather(-1, y.unsqueeze(-1).to(logp.device)).squeeze(-1)
    return [(picked * valid).sum()]


def _token_terms(logits, est: Estimator, d: Draws):
    mask = d.batch.get("attention_mask", torch.ones(logits.shape[:2], dtype=torch.long)).bool().to(logits.device)
    labels = d.batch.get("labels")
    if labels is not None and labels.shape != mask.shape:
        raise FishmergeError(
            "the label column holds one label per example, but a token-classification head needs one per token "
            "(fishmerge reads one per example): use --estimator sampled without labels (--label-field '')"
        )
    logp = logits.float().log_softmax(-1)
    y, valid = est.token_labels(logp, mask, d)
    picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return [(picked * valid).sum()]
