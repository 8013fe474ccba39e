"""Independent slow oracle: batch 1, unpadded, one backward per class or draw, parameter gradients.

Deliberately shares nothing with fishmerge.fisher.engine / fishmerge.fisher.rules. It reuses only the
public noise stream (fishmerge.fisher.estimators.example_noise) so that `sampled` draws the same y;
the draw itself (inverse CDF) is reimplemented here with numpy.
"""

from __future__ import annotations

import numpy as np
import torch
from fishmerge.fisher.estimators import example_noise


def _draw(probs: torch.Tensor, u: float) -> int:
    cdf = np.cumsum(probs.double().numpy())
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="left"), len(cdf) - 1))


def naive_fisher(model, examples, estimator: str, head: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """examples: list of dicts with 'input_ids' (list[int]), optional 'label', and 'id'; a causal LM's
    optional 'response_start': the index of the first token that counts (the prompt's are masked by hand)."""
    model.eval()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    fisher = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}

    def add(logp_term: torch.Tensor, weight: float, retain: bool) -> None:
        grads = torch.autograd.grad(logp_term, list(params.values()), retain_graph=retain, allow_unused=True)
        for (k, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[k] += weight * g.double() ** 2

    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        logits = model(input_ids=ids).logits[0].float()
        eid = ex["id"]
        if head == "sequence_classification":
            if logits.shape[-1] == 1:
                mu = logits[0]
                if estimator == "exact":
                    add(mu, 1.0, False)
                else:
                    if estimator == "sampled":
                        y = float(mu.detach()) + float(example_noise(seed, [eid], 1, "normal")[0, 0])
                    else:
                        y = float(ex["label"])
                    add(-0.5 * (y - mu) ** 2, 1.0, False)
                continue
            logp = torch.log_softmax(logits, -1)
            if estimator == "exact":
                p = logp.detach().exp()
                for c in range(logp.shape[0]):
                    add(logp[c], float(p[c]), c < logp.shape[0] - 1)
            else:
                if estimator == "sampled":
                    y = _draw(logp.detach().exp(), float(example_noise(seed, [eid], 1)[0, 0]))
                else:
                    y = ex["label"]
                add(logp[y], 1.0, False)
        elif head == "causal_lm":
            logp = torch.log_softmax(logits[:-1], -1)
            if estimator == "empirical":
                ys = ex["input_ids"][1:]
            else:
                u = example_noise(seed, [eid], len(ex["input_ids"]))[0]
                ys = [_draw(logp[t].detach().exp(), float(u[t])) for t in range(logp.shape[0])]
            start = ex.get("response_start", 0)  # prompt/response: only targets at index ≥ start count
            add(sum(logp[t, y] for t, y in enumerate(ys) if t + 1 >= start), 1.0, False)
        elif head == "token_classification":
            logp = torch.log_softmax(logits, -1)
            if estimator == "empirical":
                ys = ex["labels"]
            else:
                u = example_noise(seed, [eid], len(ex["input_ids"]))[0]
                ys = [_draw(logp[t].detach().exp(), float(u[t])) for t in range(logp.shape[0])]
            add(sum(logp[t, y] for t, y in enumerate(ys)), 1.0, False)
    return {k: (v / len(examples)).float() for k, v in fisher.items()}


def naive_grams(model, examples) -> dict[str, tuple[np.ndarray, int]]:
    """Per Linear / Conv1D weight name: (Σ over examples and tokens of x xᵀ, rows counted), fp64, by a
    loop over single unpadded examples and then over their tokens one at a time."""
    linear_types = ("Linear", "Conv1D")
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module).__name__ in linear_types and module.weight.requires_grad:

            def hook(mod, args, out, name=name):
                seen.setdefault(name, []).append(args[0].detach())

            handles.append(module.register_forward_hook(hook))
    grams: dict[str, list] = {}
    try:
        for ex in examples:
            seen.clear()
            with torch.no_grad():
                model(input_ids=torch.tensor([ex["input_ids"]]))
            for name, inputs in seen.items():
                for x in inputs:
                    x = x.double().reshape(-1, x.shape[-1]).numpy()  # (tokens or 1, in)
                    entry = grams.setdefault(f"{name}.weight", [np.zeros((x.shape[1], x.shape[1])), 0])
                    for row in x:
                        entry[0] += np.outer(row, row)
                        entry[1] += 1
    finally:
        for h in handles:
            h.remove()
    return {k: (g, n) for k, (g, n) in grams.items()}
