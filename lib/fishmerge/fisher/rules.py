"""Per-layer rules: per-example parameter gradients from a module's input and output gradient.

Each rule turns one recorded call of a module (its input activations A and the gradient B of
the summed log-likelihood w.r.t. its output) into either
- `squared`: Σₙ gₙ², the sum over examples of squared per-example gradients, without ever
  holding more than `budget` bytes of per-example tensors; or
- `per_example`: gₙ for a slice of examples, for parameters used more than once (tied
  weights), whose per-example gradients must be summed over uses before squaring.
A weight shared by Embedding and Linear calls (an LM head tied to the input embedding) has its
own path, `add_squared_tied`: the Linear part is formed per example as for an untied head and the
embedding's few rows are added into it before squaring, so no dense per-example embedding
gradient is built. All arithmetic is fp32 whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten

from fishmerge.errors import FishmergeError


@dataclass
class Call:
    """One forward call of a parameter-holding module, recorded by the engine's hooks."""

    module: nn.Module
    module_name: str
    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]  # tensor outputs that take part in autograd
    grads: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def grad_out(self) -> torch.Tensor:
        return self.grads[0]


def _chunk_size(n: int, per_example_elems: int, budget: int) -> int:
    """How many examples' fp32 per-example tensors fit in `budget` bytes (at least one)."""
    return max(1, min(n, budget // max(1, 4 * per_example_elems)))


def _slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _as_3d(x: torch.Tensor, n: int, module_name: str) -> torch.Tensor:
    """View (n, *, d) as (n, T, d) in fp32, failing loudly on a broadcast batch dimension."""
    if x.dim() < 2 or x.shape[0] != n:
        raise FishmergeError(
            f"module '{module_name}' saw an input of shape {tuple(x.shape)} in a batch of {n} "
            "examples: per-example gradients need the example dimension first. This usually "
            "means a broadcast (1, T) input such as position_ids; pass per-example inputs."
        )
    return x.reshape(n, -1, x.shape[-1]).float()


class Rule:
    """Base class; subclasses implement `per_example` (and may specialise `add_squared`)."""

    def add_squared(
        self, call: Call, n: int, names: Sequence[str], budget: int, targets: dict[str, torch.Tensor]
    ) -> None:
        """targets[k] += Σₙ gₙ² for the named local parameters (fp32, in place)."""
        self._reduce(call, n, names, budget, targets, lambda g: g.square().sum(0))

    def add_summed(
        self, call: Call, n: int, names: Sequence[str], budget: int, targets: dict[str, torch.Tensor]
    ) -> None:
        """targets[k] += Σₙ gₙ, the batch gradient; the engine checks it against autograd."""
        self._reduce(call, n, names, budget, targets, lambda g: g.sum(0))

    def _reduce(self, call, n, names, budget, targets, fn) -> None:
        params = dict(call.module.named_parameters(recurse=False))
        per_elems = sum(params[k].numel() for k in names)
        for sl in _slices(n, _chunk_size(n, per_elems, budget)):
            for k, g in self.per_example(call, n, sl, names).items():
                targets[k].add_(fn(g))

    def per_example(self, call: Call, n: int, sl: slice, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """gₙ for examples in `sl`, shape (len(sl), *param.shape), fp32."""
        raise NotImplementedError


def _live_rows(b: torch.Tensor) -> list[tuple[int, int]]:
    """Per example, the [first, last] token range whose output gradient is non-zero (pads give zeros)."""
    # (n, T); NaN rows count as live. amax and amin (no |b| temporary) measured 2-5x faster than
    # b.abs().amax(-1), torch.aminmax or (b != 0).any(-1).
    nz = (b.amax(-1) != 0) | (b.amin(-1) != 0)
    t = nz.shape[1]
    has = nz.any(1)
    first = torch.argmax(nz.int(), 1)
    last = t - torch.argmax(nz.flip(1).int(), 1)
    return [(int(f), int(e)) if h else (0, 0) for f, e, h in zip(first.tolist(), last.tolist(), has.tolist())]


# Per-example products are formed one example at a time on CPU (the buffer stays in cache;
# measured ~2x faster than a large bmm), in budgeted bmm chunks on GPU.
PER_EXAMPLE_LOOP_DEVICES = {"cpu"}
# On CPU a product larger than this is formed in row blocks of about this many bytes, each block
# squared into its slice of the accumulator for every example before moving on: the block and its
# accumulator stay in cache. Measured on a 49,152 x 576 LM head ~2x faster than whole products.
CPU_BLOCK_BYTES = 3 * 2**20


def _row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """Equal [start, stop) row ranges of a (rows, cols) fp32 matrix, each at most ~CPU_BLOCK_BYTES."""
    count = max(1, -(-4 * rows * cols // CPU_BLOCK_BYTES))
    size = -(-rows // count)
    return [(r, min(rows, r + size)) for r in range(0, rows, size)]


def _add_squared_products(
    a: torch.Tensor, b: torch.Tensor, targets: list[torch.Tensor], splits: list[int], transposed: bool
) -> None:
    """targets[j] += Σₙ (Bₙ[:, part j]ᵀ Aₙ)², one example at a time, skipping zero-gradient rows.

    The product is formed in whichever orientation has more rows (faster with MKL), block by
    block of rows into a reused buffer, and squared into an fp32 accumulator by addcmul (no
    per-example tensor kept).
    """
    rows_out = b.shape[2] >= a.shape[2]
    left, right = (b, a) if rows_out else (a, b)
    acc = torch.zeros(left.shape[2], right.shape[2], device=a.device)
    live = _live_rows(b)
    for r0, r1 in _row_blocks(*acc.shape):
        _square_block_products(left, right, live, r0, r1, acc[r0:r1])
    out_in = acc if rows_out else acc.t()
    for target, part in zip(targets, out_in.split(splits, 0)):
        target.add_(part.t() if transposed else part)


def _square_block_products(
    left: torch.Tensor,
    right: torch.Tensor,
    live: list[tuple[int, int]],
    r0: int,
    r1: int,
    acc: torch.Tensor,
    rows: tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """acc += Σₙ (Leftₙ[:, r0:r1]ᵀ Rightₙ + Eₙ)², one example at a time into one cached buffer.

    `rows` = (bounds, ids, sums) adds sparse rows Eₙ (a tied embedding's gradient): example n's
    rows are ids[bounds[n][0]:bounds[n][1]] (absolute row numbers, unique, inside [r0, r1)) with
    gradients sums[…] at the same positions.
    """
    buf = torch.empty_like(acc)
    for i, (lo, hi) in enumerate(live):
        e0, e1 = rows[0][i] if rows is not None else (0, 0)
        if hi <= lo:  # no product: only the sparse rows, squared where they are
            if e1 > e0:
                acc.index_add_(0, rows[1][e0:e1] - r0, rows[2][e0:e1].square())
            continue
        torch.mm(left[i, lo:hi, r0:r1].t(), right[i, lo:hi], out=buf)
        if e1 > e0:
            buf.index_add_(0, rows[1][e0:e1] - r0, rows[2][e0:e1])
        acc.addcmul_(buf, buf)


class LinearRule(Rule):
    """nn.Linear: gₙ = Bₙᵀ Aₙ over tokens; bias gₙ = Σₜ Bₙₜ. 2-D inputs need no per-example tensor."""

    transposed = False  # HF Conv1D stores the weight as (in, out)

    def _ab(self, call: Call, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _as_3d(call.args[0], n, call.module_name), _as_3d(call.grad_out, n, call.module_name)

    def add_squared(self, call, n, names, budget, targets):
        self.add_squared_group([(call, names, targets)], n, budget)

    def add_squared_group(
        self, members: list[tuple[Call, Sequence[str], dict[str, torch.Tensor]]], n: int, budget: int
    ) -> None:
        """add_squared for calls that share one input tensor (q/k/v, gate/up): one product per example.

        Concatenating their output gradients turns several small per-example matmuls into one
        larger one, which runs faster on CPU.
        """
        with_weight = [(c, t) for c, names, t in members if "weight" in names]
        for c, names, t in members:
            if "bias" in names:
                t["bias"].add_(_as_3d(c.grad_out, n, c.module_name).sum(1).square().sum(0))
        if not with_weight:
            return
        a = _as_3d(with_weight[0][0].args[0], n, with_weight[0][0].module_name)
        bs = [_as_3d(c.grad_out, n, c.module_name) for c, _ in with_weight]
        targets = [t["weight"] for _, t in with_weight]
        if a.shape[1] == 1:  # one token per example: (gₙ)² = (Bₙ²)ᵀ(Aₙ²), summed by one matmul
            a2 = a[:, 0].square()
            for b, w in zip(bs, targets):
                b2 = b[:, 0].square()
                w.addmm_(a2.t(), b2) if self.transposed else w.addmm_(b2.t(), a2)
        elif a.device.type in PER_EXAMPLE_LOOP_DEVICES:
            b = bs[0] if len(bs) == 1 else torch.cat(bs, -1)
            _add_squared_products(a, b, targets, [x.shape[2] for x in bs], self.transposed)
        else:
            for b, w in zip(bs, targets):
                for sl in _slices(n, _chunk_size(n, a.shape[2] * b.shape[2], budget)):
                    w.add_(self._weight_per_example(a[sl], b[sl]).square_().sum(0))

    def _weight_per_example(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return torch.bmm(a.transpose(1, 2), b)
        return torch.bmm(b.transpose(1, 2), a)

    def per_example(self, call, n, sl, names):
        a, b = self._ab(call, n)
        out = {}
        if "weight" in names:
            out["weight"] = self._weight_per_example(a[sl], b[sl])
        if "bias" in names:
            out["bias"] = b[sl].sum(1)
        return out


class Conv1DRule(LinearRule):
    """Hugging Face Conv1D (GPT-2): a Linear whose weight is stored (in, out)."""

    transposed = True


class EmbeddingRule(Rule):
    """nn.Embedding: sum output gradients per (example, token id), skip padding_idx, square.

    Never builds a batch × vocab × hidden tensor. Tied to a Linear (an LM head), its rows go into
    the head's per-example product (`add_squared_tied`); `per_example`, which is dense, is left
    for other shared uses, and then only for a budgeted slice.
    """

    def _ids_grads(self, call: Call, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = call.module
        if getattr(m, "scale_grad_by_freq", False) or getattr(m, "max_norm", None) is not None:
            raise FishmergeError(
                f"embedding '{call.module_name}' uses scale_grad_by_freq or max_norm, which fishmerge's "
                "embedding rule does not model; disable them for Fisher estimation."
            )
        ids = call.args[0]
        if ids.dim() < 1 or ids.shape[0] != n:
            _as_3d(ids.unsqueeze(-1).float(), n, call.module_name)  # raises the broadcast error
        ids = ids.reshape(n, -1)
        b = call.grad_out.reshape(n, ids.shape[1], -1).float()
        return ids, b

    def _row_sums(self, ids: torch.Tensor, b: torch.Tensor, pad: int | None, vocab: int):
        """Unique (example, id) keys and the summed output gradient of each."""
        s = ids.shape[0]
        example = torch.arange(s, device=ids.device).unsqueeze(1).expand_as(ids)
        keep = torch.ones_like(ids, dtype=torch.bool) if pad is None else ids != pad
        keys = (example * vocab + ids)[keep]
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(uniq.numel(), b.shape[-1], device=b.device, dtype=torch.float32)
        sums.index_add_(0, inverse, b[keep])
        return uniq, sums

    def add_squared(self, call, n, names, budget, targets):
        ids, b = self._ids_grads(call, n)
        m = call.module
        uniq, sums = self._row_sums(ids, b, m.padding_idx, m.num_embeddings)
        targets["weight"].index_add_(0, uniq % m.num_embeddings, sums.square())

    def add_summed(self, call, n, names, budget, targets):
        ids, b = self._ids_grads(call, n)
        m = call.module
        uniq, sums = self._row_sums(ids, b, m.padding_idx, m.num_embeddings)
        targets["weight"].index_add_(0, uniq % m.num_embeddings, sums)

    def row_keys(self, call: Call, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(example · vocab + id, output gradient) per non-padding token of this call, fp32."""
        ids, b = self._ids_grads(call, n)
        m = call.module
        keep = torch.ones_like(ids, dtype=torch.bool) if m.padding_idx is None else ids != m.padding_idx
        example = torch.arange(n, device=ids.device).unsqueeze(1)
        return (example * m.num_embeddings + ids)[keep], b[keep]

    def per_example(self, call, n, sl, names):
        ids, b = self._ids_grads(call, n)
        m = call.module
        ids, b = ids[sl], b[sl]
        uniq, sums = self._row_sums(ids, b, m.padding_idx, m.num_embeddings)
        dense = torch.zeros(ids.shape[0] * m.num_embeddings, b.shape[-1], device=b.device, dtype=torch.float32)
        dense.index_add_(0, uniq, sums)
        return {"weight": dense.view(ids.shape[0], m.num_embeddings, b.shape[-1])}


def fits_tied_path(uses: Sequence[tuple[Rule, str]]) -> bool:
    """Whether `add_squared_tied` covers a shared parameter: the weight of Linear / Embedding uses only."""
    return all(k == "weight" and (type(r) is LinearRule or isinstance(r, EmbeddingRule)) for r, k in uses)


def add_squared_tied(uses: Sequence[tuple[Rule, Call]], n: int, budget: int, target: torch.Tensor) -> None:
    """target += Σₙ gₙ² for a (vocab, hidden) weight shared by nn.Linear and nn.Embedding calls.

    gₙ = Σ_linear Bₙᵀ Aₙ + Eₙ, with Eₙ the embedding's summed output gradients on the ≤ T rows
    example n reads (padding_idx skipped). The Linear uses concatenate over tokens into one
    product; Eₙ's rows are added into that product's buffer before it is squared (the same
    square of the sum as the naive loop, so no cancellation), and a dense per-example
    vocab × hidden embedding gradient is never built.
    """
    vocab, hidden = target.shape
    linear = [c for r, c in uses if isinstance(r, LinearRule)]
    keys, sums = _tied_rows([(r, c) for r, c in uses if isinstance(r, EmbeddingRule)], n, target)
    if not linear:
        target.index_add_(0, keys % vocab, sums.square())
        return
    a = _cat_tokens([_as_3d(c.args[0], n, c.module_name) for c in linear])
    b = _cat_tokens([_as_3d(c.grad_out, n, c.module_name) for c in linear])
    if a.device.type in PER_EXAMPLE_LOOP_DEVICES:
        _tied_blocked(a, b, keys, sums, target)
    else:
        for sl in _slices(n, _chunk_size(n, vocab * hidden, budget)):
            g = torch.bmm(b[sl].transpose(1, 2), a[sl])  # (s, vocab, hidden)
            e0, e1 = torch.searchsorted(keys, torch.tensor([sl.start, sl.stop], device=keys.device) * vocab).tolist()
            g.view(-1, hidden).index_add_(0, keys[e0:e1] - sl.start * vocab, sums[e0:e1])
            target.add_(g.square_().sum(0))


def _cat_tokens(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs, 1)


def _tied_rows(
    embeddings: Sequence[tuple[EmbeddingRule, Call]], n: int, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique (example · vocab + id) keys over all embedding uses, and their summed gradients."""
    parts = [r.row_keys(c, n) for r, c in embeddings]
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=target.device), target.new_zeros(0, target.shape[1])
    keys = torch.cat([k for k, _ in parts])
    uniq, inverse = torch.unique(keys, return_inverse=True)
    grads = torch.cat([g for _, g in parts])
    sums = torch.zeros(uniq.numel(), grads.shape[-1], device=grads.device).index_add_(0, inverse, grads)
    return uniq, sums


def _tied_blocked(
    a: torch.Tensor, b: torch.Tensor, keys: torch.Tensor, sums: torch.Tensor, target: torch.Tensor
) -> None:
    """CPU: vocabulary blocks outer, examples inner, each example's embedding rows of the block added in."""
    n, vocab = b.shape[0], target.shape[0]
    blocks = _row_blocks(*target.shape)
    edges = [r0 for r0, _ in blocks] + [vocab]
    starts = (torch.arange(n).unsqueeze(1) * vocab + torch.tensor(edges).unsqueeze(0)).to(keys.device)
    bounds = torch.searchsorted(keys, starts.flatten()).view(n, -1).tolist()  # (n, blocks + 1)
    ids = keys % vocab
    live = _live_rows(b)
    for j, (r0, r1) in enumerate(blocks):
        rows = ([(e[j], e[j + 1]) for e in bounds], ids, sums)
        _square_block_products(b, a, live, r0, r1, target[r0:r1], rows)


class _AffineNormRule(Rule):
    """Norms y = x̂ ⊙ w (+ b): per-example weight gradient Σₜ Bₙₜ ⊙ x̂ₙₜ, bias Σₜ Bₙₜ."""

    def normalized(self, module: nn.Module, x: torch.Tensor, dims: int) -> torch.Tensor:
        raise NotImplementedError

    def per_example(self, call, n, sl, names):
        m = call.module
        shape = tuple(m.weight.shape) if getattr(m, "weight", None) is not None else tuple(m.bias.shape)
        dims = len(shape)
        x = call.args[0]
        if x.dim() < 1 or x.shape[0] != n:
            _as_3d(x, n, call.module_name)  # raises the broadcast error
        s = sl.stop - sl.start
        x = x[sl].float().reshape(s, -1, *shape)
        b = call.grad_out[sl].float().reshape(s, -1, *shape)
        out = {}
        if "weight" in names:
            out["weight"] = (b * self.normalized(m, x, dims)).sum(1)
        if "bias" in names:
            out["bias"] = b.sum(1)
        return out


class LayerNormRule(_AffineNormRule):
    def normalized(self, module, x, dims):
        return torch.nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)


class RMSNormRule(_AffineNormRule):
    """torch.nn.RMSNorm and Llama-style RMSNorm (w ⊙ x·rsqrt(mean(x²)+eps), no mean subtraction)."""

    def normalized(self, module, x, dims):
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = getattr(module, "eps", None)
        if eps is None:
            eps = torch.finfo(x.dtype).eps
        red = tuple(range(-dims, 0))
        return x * torch.rsqrt(x.square().mean(red, keepdim=True) + eps)


class VmapFallbackRule(Rule):
    """Any other parameter-holding module: per-example gradients by torch.func vmap(grad).

    Correct for modules whose forward treats examples independently (eval mode); slower than a
    dedicated rule. Children's hooks are switched off by the engine while it runs.
    """

    def __init__(self, disable_hooks: Callable[[], object]):
        self.disable_hooks = disable_hooks

    def per_example(self, call, n, sl, names):
        m = call.module
        params = {k: p.detach() for k, p in m.named_parameters(recurse=False) if k in names}
        arg_dims = tuple(0 if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n else None for a in call.args)
        args = tuple(a[sl] if d == 0 else a for a, d in zip(call.args, arg_dims))
        grads = [g[sl] if g is not None else torch.zeros_like(o[sl]) for o, g in zip(call.outputs, call.grads)]
        kwargs = call.kwargs

        def contracted(p, xs, gs):
            xs1 = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(xs, arg_dims))
            out = functional_call(m, p, xs1, kwargs)
            leaves = [t for t in tree_flatten(out)[0] if torch.is_tensor(t) and t.is_floating_point()]
            return sum((leaf.float() * g.unsqueeze(0)).sum() for leaf, g in zip(leaves, gs))

        try:
            with self.disable_hooks():
                g = vmap(grad(contracted), in_dims=(None, arg_dims, 0))(params, args, grads)
        except Exception as exc:  # torch.func raises many types; name the module and the way out
            raise FishmergeError(
                f"cannot compute per-example gradients of module '{call.module_name}' "
                f"({type(m).__name__}) with the vmap fallback: {exc}. Register a rule for it with "
                "fishmerge.fisher.rules.register_rule, or freeze its parameters."
            ) from exc
        return {k: v.float() for k, v in g.items()}


_RULES: dict[type, Rule] = {}
_RULES_BY_NAME: dict[str, Rule] = {}


def register_rule(module_type: type | str, rule: Rule) -> None:
    """Register a per-layer rule for a module class (or a class name, for classes not importable)."""
    if isinstance(module_type, str):
        _RULES_BY_NAME[module_type] = rule
    else:
        _RULES[module_type] = rule


register_rule(nn.Linear, LinearRule())
register_rule(nn.Embedding, EmbeddingRule())
register_rule(nn.LayerNorm, LayerNormRule())
if hasattr(nn, "RMSNorm"):
    register_rule(nn.RMSNorm, RMSNormRule())
register_rule("Conv1D", Conv1DRule())
# Norm classes verified to compute weight * (x * rsqrt(mean(x^2) + variance_epsilon)).
for _name in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "T5LayerNorm"):
    register_rule(_name, RMSNormRule())


def rule_for(module: nn.Module) -> Rule | None:
    """The registered rule for a module's exact class, or None."""
    cls = type(module)
    if cls in _RULES:
        return _RULES[cls]
    if cls.__name__ in _RULES_BY_NAME:
        return _RULES_BY_NAME[cls.__name__]
    return None
