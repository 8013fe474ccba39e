"""Input Gram matrices of Linear layers, from the Fisher engine's forward pass (RegMean's statistic).

For every Linear / HF Conv1D module whose weight is trainable and used once (not tied), the
engine's hook already holds the module's input x; this adds G = Σₙ Σₜ xₙₜ xₙₜᵀ over real tokens
(the attention mask's ones; a 2-D input counts one row per example) and the token count. Modules
that read the very same input tensor (q/k/v, gate/up) share one Gram: one product, stored once.
Sums are kept in fp32 (fp64 for an fp64 model), never divided: a consumer divides by `tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fishmerge.errors import FishmergeError
from fishmerge.fisher.rules import Call, LinearRule
from fishmerge.fisher.statistics import LAYOUT_IN_OUT, LAYOUT_OUT_IN


@dataclass
class Gram:
    """One shared input's Gram: the sum, the rows counted, and the weights (parameter names) reading it."""

    sum: torch.Tensor
    tokens: int
    weights: list[str]
    layouts: dict[str, str]


def gram_layout(rule: LinearRule) -> str:
    """Which way the weight of a module with this rule is stored."""
    return LAYOUT_IN_OUT if rule.transposed else LAYOUT_OUT_IN


SYMMETRIC_BLOCK = 384  # Grams wider than this are formed block by block, upper triangle only


def _rows(x: torch.Tensor, mask: torch.Tensor | None, n: int, module_name: str) -> tuple[torch.Tensor, int]:
    """The input's rows that count (real tokens only; padding rows are dropped), as (rows, in)."""
    if x.dim() < 2 or x.shape[0] != n:
        raise FishmergeError(
            f"module '{module_name}' saw an input of shape {tuple(x.shape)} in a batch of {n}: Gram statistics "
            "need the example dimension first"
        )
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.dim() == 2:
        return x.to(dtype), n
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        keep = mask.bool()
        return x[keep].to(dtype), int(keep.sum())
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    return rows, rows.shape[0]


class GramAccumulator:
    """Σ xxᵀ per shared Linear input over batches; fed by the Fisher engine with each batch's calls."""

    def __init__(self) -> None:
        self.grams: dict[tuple[str, ...], Gram] = {}

    def add(
        self,
        members: Sequence[tuple[Call, str, LinearRule]],
        mask: torch.Tensor | None,
        n: int,
    ) -> None:
        """Add one shared input's rows: `members` are the (call, weight's parameter name, rule) reading it."""
        call = members[0][0]
        rows, count = _rows(call.args[0].detach(), mask, n, call.module_name)
        key = tuple(name for _, name, _ in members)
        gram = self.grams.get(key)
        if gram is None:
            d = rows.shape[1]
            gram = Gram(
                torch.zeros(d, d, dtype=rows.dtype, device=rows.device),
                0,
                list(key),
                {name: gram_layout(rule) for _, name, rule in members},
            )
            self.grams[key] = gram
        _add_upper(gram.sum, rows)
        gram.tokens += count

    def result(self) -> dict[str, Gram]:
        """Grams by their first weight's parameter name; a weight may read only one input."""
        seen: dict[str, tuple[str, ...]] = {}
        for key in self.grams:
            for name in key:
                if name in seen and seen[name] != key:
                    raise FishmergeError(
                        f"weight '{name}' was read with different input groupings in different batches: "
                        "its Gram is ambiguous"
                    )
                seen[name] = key
        return {g.weights[0]: Gram(_symmetrized(g.sum), g.tokens, g.weights, g.layouts) for g in self.grams.values()}


def _blocks(d: int) -> list[tuple[int, int]]:
    count = max(1, -(-d // SYMMETRIC_BLOCK))
    size = -(-d // count)
    return [(a, min(d, a + size)) for a in range(0, d, size)]


def _add_upper(acc: torch.Tensor, rows: torch.Tensor) -> None:
    """acc += rowsᵀ rows on the diagonal and upper blocks only: a Gram is symmetric, so the lower
    blocks (about half the multiply-adds of a wide one) are copied from the upper ones at the end."""
    blocks = _blocks(rows.shape[1])
    if len(blocks) == 1:
        acc.addmm_(rows.t(), rows)
        return
    cols = [rows[:, a:b].contiguous() for a, b in blocks]
    for i, (a, b) in enumerate(blocks):
        acc[a:b, a:].addmm_(cols[i].t(), rows[:, a:])


def _symmetrized(acc: torch.Tensor) -> torch.Tensor:
    """The full Gram from one accumulated by `_add_upper` (lower blocks from the upper ones)."""
    blocks = _blocks(acc.shape[0])
    if len(blocks) == 1:
        return acc.clone()
    out = acc.clone()
    for a, b in blocks:
        out[b:, a:b] = acc[a:b, b:].t()
        # a diagonal block from one GEMM need not be bitwise symmetric (the kernel's summation order
        # differs between (i, j) and (j, i)): its upper triangle is mirrored too
        upper = torch.triu(acc[a:b, a:b])
        out[a:b, a:b] = upper + torch.triu(upper, 1).t()
    return out
