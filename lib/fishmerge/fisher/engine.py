"""Diagonal Fisher of an in-memory torch model: hooks + per-layer rules, at about backprop cost.

One forward pass per batch records each parameter-holding module's inputs and outputs; each
log-likelihood term is backpropagated to those *outputs only* (no parameter-gradient matmuls),
and the per-layer rules turn (input, output-gradient) into squared per-example gradients.
Tied parameters sum their per-example gradients over all uses before squaring. The first batch
is checked against autograd's batch gradient, so a parameter used outside its module's forward
fails loudly instead of being skipped.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fishmerge.errors import FishmergeError
from fishmerge.fisher.estimators import DEFAULT_ESTIMATOR, detect_head, estimator_for, log_likelihood_terms
from fishmerge.fisher.grams import Gram, GramAccumulator
from fishmerge.fisher.rules import (
    Call,
    LinearRule,
    Rule,
    VmapFallbackRule,
    _chunk_size,
    _slices,
    add_squared_tied,
    fits_tied_path,
    rule_for,
)
from fishmerge.fisher.statistics import FISHER, GRAM, STATISTICS, check_statistics  # noqa: F401  (re-exported)
from fishmerge.forward.first_position import first_position_only
from fishmerge.forward.onednn_linear import onednn_linears

DEFAULT_MAX_MEMORY = 512 * 2**20


def _derives_positions_from_ids(model: nn.Module) -> bool:
    """RoBERTa-style embeddings compute per-example position ids (offset by padding_idx) themselves."""
    return any(hasattr(type(m), "create_position_ids_from_input_ids") for m in model.modules())


class InputPlan:
    """Which extra forward kwargs a model takes, decided once per model (not per batch)."""

    def __init__(self, model: nn.Module):
        accepted = inspect.signature(model.forward).parameters
        self.position_ids = "position_ids" in accepted and not _derives_positions_from_ids(model)
        self.use_cache = "use_cache" in accepted

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward kwargs with per-example position ids (never a broadcast (1, T) tensor)."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in batch:
            inputs["position_ids"] = batch["position_ids"]
        elif self.position_ids:
            inputs["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)
        if "token_type_ids" in batch:  # never invent them: GPT-2 would add wte[0] to every position
            inputs["token_type_ids"] = batch["token_type_ids"]
        if self.use_cache:
            inputs["use_cache"] = False
        return inputs


class FisherAccumulator:
    """Accumulates Σₙ E_y[(∇θ log p(y|xₙ))²] over batches for every trainable parameter.

    Use as a context manager (hooks are removed on exit), feed `add_batch`, read `fisher()`.
    The model is put in eval mode. `max_memory` bounds the bytes of per-example gradient
    tensors held at once (examples are sub-chunked to fit). `fallback="vmap"` computes modules
    without a rule by torch.func; `"error"` rejects them up front. `statistics` names what is
    accumulated: "fisher" (the diagonal Fisher) and/or "gram" (Linear input Grams, `grams()`).
    """

    def __init__(
        self,
        model: nn.Module,
        estimator: str = DEFAULT_ESTIMATOR,
        *,
        head: str | None = None,
        seed: int = 0,
        max_memory: int = DEFAULT_MAX_MEMORY,
        fallback: str = "vmap",
        max_exact_classes: int = 64,
        verify: bool = True,
        statistics: Sequence[str] = (FISHER,),
    ):
        self.statistics = check_statistics(statistics)
        self.head = head or detect_head(model)
        estimator = estimator_for(estimator, self.head)  # `auto` by head; an unknown name fails here, before any hook
        if fallback not in ("vmap", "error"):
            raise FishmergeError(f"unknown fallback '{fallback}': choose 'vmap' or 'error'")
        self.model = model.eval()
        self.estimator = estimator
        self._input_plan = InputPlan(model)
        self.seed = seed
        self.max_memory = int(max_memory)
        self.max_exact_classes = max_exact_classes
        self.verify_pending = verify and FISHER in self.statistics
        self._grams = GramAccumulator() if GRAM in self.statistics else None
        self.n_examples = 0
        self._recording = False
        self._calls: list[Call] = []

        self.names: dict[int, str] = {}
        self.params: dict[str, nn.Parameter] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names[id(p)] = name
                self.params[name] = p
        if not self.params:
            raise FishmergeError("the model has no trainable parameters: nothing to estimate a Fisher for")
        self.sums = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in self.params.items()}

        self._rules: dict[nn.Module, Rule] = {}
        fallback_rule = VmapFallbackRule(self._hooks_off)
        uncovered = []
        self._handles = []
        for mname, module in model.named_modules():
            own = [k for k, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = rule_for(module)
            if rule is None:
                uncovered.append(f"{mname} ({type(module).__name__})")
                rule = fallback_rule
            self._rules[module] = rule
            self._handles.append(module.register_forward_hook(self._make_hook(mname), with_kwargs=True))
        if uncovered and fallback == "error":
            self.close()
            raise FishmergeError(
                f"no per-layer rule for parameter-holding module(s): {', '.join(uncovered)}. Use the vmap "
                "fallback (fallback='vmap', CLI --fallback vmap), register a rule with "
                "fishmerge.fisher.rules.register_rule, or freeze those parameters."
            )
        self.fallback_modules = uncovered

    # hooks ---------------------------------------------------------------------------------
    def _make_hook(self, module_name: str):
        def hook(module, args, kwargs, output):
            if not self._recording:
                return None
            outs = [t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad]
            if not outs:
                return None
            args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            self._calls.append(Call(module, module_name, args, dict(kwargs), outs))
            return None

        return hook

    @contextlib.contextmanager
    def _hooks_off(self) -> Iterator[None]:
        was, self._recording = self._recording, False
        try:
            yield
        finally:
            self._recording = was

    def close(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FisherAccumulator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # accumulation --------------------------------------------------------------------------
    def add_batch(self, batch: Mapping[str, torch.Tensor], example_ids: Sequence[int]) -> None:
        """Add the squared per-example gradients of a batch (tensors on the model's device)."""
        n = int(batch["input_ids"].shape[0])
        if len(example_ids) != n:
            raise FishmergeError(f"got {len(example_ids)} example ids for a batch of {n}")
        self._calls = []
        self._recording = True
        # A classifier's last layer for position 0 only: the other positions' queries and feed-forward get
        # no gradient, so the Fisher is the same. Grams read every token's input, so they keep the full layer.
        cut = first_position_only(self.model) if self._grams is None else contextlib.nullcontext()
        # Large Linear products on oneDNN on CPU (forward and the backward to their inputs): the rules form the
        # weights' gradients from inputs and output gradients. Not on the batch that checks the rules against
        # autograd's own weight gradients (pinned off there, whatever a caller around us asked).
        fast = onednn_linears(self.model, input_grads_only=not self.verify_pending)
        try:
            with torch.enable_grad(), cut, fast:
                out = self.model(**self._input_plan.inputs(batch))
        finally:
            self._recording = False
        calls, self._calls = self._calls, []
        uses: dict[int, int] = defaultdict(int)
        for c in calls:
            for _, p in c.module.named_parameters(recurse=False):
                if id(p) in self.names:
                    uses[id(p)] += 1
        if self._grams is not None:
            self._add_grams(calls, uses, batch.get("attention_mask"), n)
        if FISHER not in self.statistics:
            self.n_examples += n
            return
        logits = out.logits if hasattr(out, "logits") else out
        terms = log_likelihood_terms(
            logits,
            dict(batch),
            head=self.head,
            estimator=self.estimator,
            seed=self.seed,
            example_ids=example_ids,
            max_exact_classes=self.max_exact_classes,
        )
        outputs = [t for c in calls for t in c.outputs]
        for i, term in enumerate(terms):
            verify = self.verify_pending and i == 0
            retain = verify or i < len(terms) - 1
            grads = torch.autograd.grad(term, outputs, retain_graph=retain, allow_unused=True)
            it = iter(grads)
            for c in calls:
                c.grads = [next(it) for _ in c.outputs]
            live = [c for c in calls if any(g is not None for g in c.grads)]
            if verify:  # a batch whose gradient is all zero (only masked tokens) checks nothing: the next one does
                self.verify_pending = not self._verify(term, live, n, retain_graph=i < len(terms) - 1)
            self._accumulate(live, n, uses)
        self.n_examples += n

    def _add_grams(self, calls: list[Call], uses: Mapping[int, int], mask, n: int) -> None:
        """Each Linear input's Gram, once per input tensor read by untied trainable weights."""
        same_input: dict[tuple, list] = defaultdict(list)
        for c in calls:
            rule = self._rules[c.module]
            weight = getattr(c.module, "weight", None)
            x = c.args[0] if c.args else None
            if not isinstance(rule, LinearRule) or not torch.is_tensor(x) or id(weight) not in self.names:
                continue
            if uses[id(weight)] != 1:
                continue  # tied (an LM head sharing the embedding): not a plain Linear layer
            same_input[(x.data_ptr(), tuple(x.shape), x.stride())].append((c, self.names[id(weight)], rule))
        for members in same_input.values():
            self._grams.add(members, mask, n)

    def grams(self) -> dict[str, Gram]:
        """The input Grams (sums over real tokens, with counts) by the first weight reading each input."""
        if self._grams is None:
            raise FishmergeError("this accumulator was not asked for Gram statistics (statistics=['gram'])")
        return {k: Gram(g.sum.cpu(), g.tokens, g.weights, g.layouts) for k, g in self._grams.result().items()}

    def _own(self, call: Call) -> list[tuple[str, nn.Parameter]]:
        return [(k, p) for k, p in call.module.named_parameters(recurse=False) if id(p) in self.names]

    def _accumulate(self, calls: list[Call], n: int, uses: Mapping[int, int]) -> None:
        shared: dict[int, list[tuple[Call, str]]] = defaultdict(list)
        same_input: dict[tuple, list] = defaultdict(list)  # Linear calls reading one tensor (q/k/v)
        for c in calls:
            _fill_missing_grads(c)
            rule = self._rules[c.module]
            single = []
            for k, p in self._own(c):
                if uses[id(p)] == 1:
                    single.append(k)
                else:
                    shared[id(p)].append((c, k))
            if not single:
                continue
            targets = {k: self.sums[self.names[id(getattr(c.module, k))]] for k in single}
            x = c.args[0] if c.args else None
            if isinstance(rule, LinearRule) and torch.is_tensor(x):
                key = (rule, x.data_ptr(), tuple(x.shape), x.stride())
                same_input[key].append((c, single, targets))
            else:
                rule.add_squared(c, n, single, self.max_memory, targets)
        for (rule, *_), members in same_input.items():
            rule.add_squared_group(members, n, self.max_memory)
        for pid, places in shared.items():
            self._add_shared(self.names[pid], places, n)

    def _add_shared(self, name: str, places: list[tuple[Call, str]], n: int) -> None:
        """Σₙ (Σ_uses gₙ)² for a parameter used by several calls (tied weights): sum, then square."""
        rules = [self._rules[c.module] for c, _ in places]
        if fits_tied_path([(r, k) for r, (_, k) in zip(rules, places)]):  # embedding / LM head: no dense rows
            add_squared_tied([(r, c) for r, (c, _) in zip(rules, places)], n, self.max_memory, self.sums[name])
            return
        for sl in _slices(n, _chunk_size(n, self.params[name].numel(), self.max_memory)):
            total = None
            for (c, k), rule in zip(places, rules):
                g = rule.per_example(c, n, sl, [k])[k]
                total = g if total is None else total.add_(g)
            self.sums[name].add_(total.square().sum(0))

    def _verify(self, term: torch.Tensor, calls: list[Call], n: int, retain_graph: bool) -> bool:
        """Compare Σₙ gₙ from the rules with autograd's batch gradient, once, on the first batch whose
        gradient is not all zero; whether it could compare (False: an all-zero gradient, nothing to see)."""
        names = list(self.params)
        true = torch.autograd.grad(term, [self.params[k] for k in names], retain_graph=True, allow_unused=True)
        ours = {k: torch.zeros_like(self.sums[k]) for k in names}
        for c in calls:
            _fill_missing_grads(c)
            own = [k for k, _ in self._own(c)]
            targets = {k: ours[self.names[id(getattr(c.module, k))]] for k in own}
            self._rules[c.module].add_summed(c, n, own, self.max_memory, targets)
        true = [torch.zeros_like(ours[k]) if t is None else t.float() for k, t in zip(names, true)]
        total = float(torch.stack([t.norm() for t in true]).norm())
        if total == 0.0:
            return False
        floor = 1e-5 * total  # grads that are 0 in exact math
        for k, t in zip(names, true):
            p = self.params[k]
            tol = 1e-3 if p.dtype == torch.float32 or p.dtype == torch.float64 else 5e-2
            err = (ours[k] - t).norm()
            scale = torch.maximum(t.norm(), ours[k].norm())
            if err > tol * scale + floor:
                raise FishmergeError(
                    f"the per-layer rules do not reproduce the gradient of parameter '{k}' (relative error "
                    f"{float(err / scale):.2e}): it is used outside its module's forward, or by a module "
                    "whose rule does not fit it. Freeze it, or register a rule (fishmerge.fisher.rules.register_rule)."
                )
        return True

    def fisher(self) -> dict[str, torch.Tensor]:
        """F = (1/N) Σₙ E_y[gₙ²] per parameter name, fp32 on CPU."""
        if self.n_examples == 0:
            raise FishmergeError("no examples were seen: the dataset selection is empty")
        if FISHER not in self.statistics:
            raise FishmergeError("this accumulator was not asked for the Fisher (statistics without 'fisher')")
        return {k: (v / self.n_examples).cpu() for k, v in self.sums.items()}


def _fill_missing_grads(call: Call) -> None:
    """An output that did not reach the loss has a zero gradient."""
    call.grads = [torch.zeros_like(o) if g is None else g for o, g in zip(call.outputs, call.grads)]


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[tuple[Mapping[str, torch.Tensor], Sequence[int]]],
    estimator: str = DEFAULT_ESTIMATOR,
    **options,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher over `batches` of (model inputs, example ids); options as FisherAccumulator."""
    with FisherAccumulator(model, estimator, **options) as acc:
        for batch, ids in batches:
            acc.add_batch(batch, ids)
        return acc.fisher()
