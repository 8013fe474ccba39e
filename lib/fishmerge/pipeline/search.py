"""Choose λ on validation data: merge each candidate in memory with the plan's method, score it.

Candidates are a grid for two models (λ₁ = 0, 1/(p−1), …, 1) and Dirichlet(1, …, 1) samples
plus the uniform λ for more. Each candidate is merged with the same method classes the
out-of-core executor uses (whole tensors, fp32), loaded into each target's model with its own
head, and scored on that target's task; the candidate's score is the mean over targets. The
first best candidate wins ties; best is the highest or the lowest, as the metric declares
(accuracy: highest; a causal LM's nll: lowest). Needs the models and Fishers in memory (search is for models
that fit; the final merge is out of core).
"""

from __future__ import annotations

import copy
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from fishmerge.errors import FishmergeError
from fishmerge.fisher.statistics import FISHER
from fishmerge.merge.config import MergeConfig
from fishmerge.merge.plan import MergePlan
from fishmerge.pipeline.evaluation import (
    class_probabilities,
    classification_metrics,
    ensemble_logprobs,
    ensemble_probabilities,
    label_ids,
    lm_metrics,
    lm_token_logprobs,
    load_eval_rows,
)
from fishmerge.pipeline.huge_pages import numpy_small_pages
from fishmerge.pipeline.metrics import CAUSAL_LM, call_scorer, check_applies, get_metric, key_name, task_kind
from fishmerge.schema import Strict


def candidates(k: int, strategy: str | None, points: int, seed: int = 0) -> list[list[float]]:
    """λ vectors to try: a grid for 2 models, Dirichlet samples (and the uniform λ) for K > 2."""
    strategy = strategy or ("grid" if k == 2 else "dirichlet")
    if strategy == "grid":
        if k != 2:
            raise FishmergeError(f"search.strategy grid is for 2 models; this merge has {k}: use dirichlet")
        return [[float(w), float(1 - w)] for w in np.linspace(0.0, 1.0, points)]
    rng = np.random.default_rng(seed)
    out = [[1.0 / k] * k]
    out += [[float(x) for x in rng.dirichlet(np.ones(k))] for _ in range(points)]
    return out


@dataclass
class MergeInputs:
    """The merged tensors of every model (and Fishers, base) in memory, fp32, with per-merge context."""

    thetas: list[dict[str, np.ndarray]]
    fishers: list[dict[str, np.ndarray]] | None
    base: dict[str, np.ndarray] | None
    context: dict
    grams: dict[str, list[np.ndarray]] | None = None  # weight key -> every model's mean Gram (Gram-merged tensors)

    @property
    def nbytes(self) -> int:
        parts = [*self.thetas, *(self.fishers or []), *([self.base] if self.base else [])]
        grams = sum(g.nbytes for gs in (self.grams or {}).values() for g in gs)
        return sum(v.nbytes for d in parts for v in d.values()) + grams


def load_inputs(plan: MergePlan) -> MergeInputs:
    """Read the shared tensors of every model (and Fishers, base) once, for many candidate merges;
    the method's pre-passes run by the executor's own step."""
    from fishmerge.merge.executor import run_prepasses
    from fishmerge.merge.inputs import base_rows, fisher_rows, gram_mean, model_rows

    method = plan.merge_method

    def whole(read) -> dict[str, np.ndarray]:
        """Every merged tensor whole, read by `read(key, r0, r1)`."""
        refs = plan.models[0].refs
        return {k: read(k, 0, refs[k].rows).reshape(refs[k].shape) for k in plan.shared}

    models = range(len(plan.models))
    thetas = [whole(partial(model_rows, plan, i)) for i in models]
    fishers = [whole(partial(fisher_rows, plan, i)) for i in models] if FISHER in plan.statistics else None
    base = whole(partial(base_rows, plan)) if method.needs_base else None
    grams = {k: [gram_mean(plan, i, k) for i in models] for k in plan.gram_layouts} or None
    return MergeInputs(thetas, fishers, base, run_prepasses(plan), grams)


def merge_in_memory(
    plan: MergePlan, inputs: MergeInputs, weights: list[float], target: int, shared: dict | None = None
) -> dict[str, np.ndarray]:
    """The merged shared tensors for one target and one λ (the executor's formula on whole tensors).
    `shared` (one dict per λ) keeps the tensors that are the same for every target, merged once."""
    method = plan.merge_method
    lam = method.check_weights(weights)
    out = {}
    for key in plan.shared:
        if shared is not None and key in shared:
            out[key] = shared[key]
            continue
        by_gram = key in plan.gram_layouts
        out[key] = method.merge(
            [t[key] for t in inputs.thetas],
            lam,
            params=plan.params,
            target=target,
            fishers=[f[key] for f in inputs.fishers] if inputs.fishers is not None and not by_gram else None,
            base=inputs.base[key] if inputs.base is not None else None,
            context=inputs.context,
            key=key,
            **({"grams": inputs.grams[key], "layout": plan.gram_layouts[key]} if by_gram else {}),
        )
        if shared is not None and plan.same_for_every_target(key):
            shared[key] = out[key]
    return out


@dataclass
class TaskData:
    """One target's task: its rows, and how to read them (labels for classifiers; for causal LMs the
    text fields — one, or prompt and response — or a chat messages column)."""

    name: str
    kind: str
    rows: list[dict]
    labels: np.ndarray | None
    text_fields: list[str]
    messages_field: str | None = None


def task_data(
    cfg: MergeConfig, target: str, split: str | None, limit: int | None, label2id: dict | None, kind: str
) -> TaskData:
    """The evaluation rows of a target's task (its `data:`), first `limit` rows of `split`."""
    m = next(m for m in cfg.models if m.name == target)
    if m.data is None:
        raise FishmergeError(f"model '{target}' has no `data:`: cannot evaluate or search λ for it")
    split = split or m.data.eval_split
    if kind == CAUSAL_LM:
        fields = [m.data.messages_field] if m.data.messages_field else list(m.data.text_fields)
        rows = load_eval_rows(m.data.path, split, fields, None, limit)
        return TaskData(target, kind, rows, None, list(m.data.text_fields), m.data.messages_field)
    if not m.data.label_field:
        raise FishmergeError(f"model '{target}' has no `data.label_field`: cannot evaluate or search λ for it")
    rows = load_eval_rows(m.data.path, split, m.data.text_fields, m.data.label_field, limit)
    return TaskData(target, kind, rows, label_ids(rows, m.data.label_field, label2id), list(m.data.text_fields))


def load_state(model: torch.nn.Module, tensors: dict[str, np.ndarray]) -> None:
    """Put checkpoint-keyed fp32 arrays into a model (cast to its dtype); every key must land."""
    state = model.state_dict()
    missing = [k for k in tensors if k not in state]
    if missing:
        raise FishmergeError(f"merged tensors {missing[:3]} are not parameters of {type(model).__name__}")
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(torch.from_numpy(np.ascontiguousarray(v)).to(state[k].dtype))


class Scorer:
    """Targets' models (own heads) and tasks, ready to score merged tensors or whole models by `metrics`
    (built-in names or user scorers `module:function`; keys of the results are `key_name`s)."""

    def __init__(
        self,
        cfg: MergeConfig,
        plan: MergePlan,
        split: str | None,
        limit: int | None,
        device: str,
        batch_size: int = 32,
        max_length: int = 128,
        metrics: list[str] | None = None,
    ):
        from fishmerge.fisher.estimators import detect_head
        from fishmerge.io.checkpoint import clamp_length, load_model

        self.plan = plan
        self.models, self.tokenizers, self.tasks = {}, {}, {}
        for t in plan.targets:
            model, tok = load_model(plan.models[t.index].path, device=device)
            model.eval()
            kind = task_kind(detect_head(model))
            self.models[t.name], self.tokenizers[t.name] = model, tok
            label2id = getattr(model.config, "label2id", None)
            self.tasks[t.name] = task_data(cfg, t.name, split, limit, label2id, kind)
        self.metrics = {m: get_metric(m) for m in metrics or []}
        for t in plan.targets:
            for metric in self.metrics.values():
                check_applies(metric, self.tasks[t.name].kind, t.name, "metric")
        self.device = device
        for t in plan.targets:  # the position table bounds the length for every target
            where = "λ search and evaluation"
            max_length = clamp_length(max_length, self.models[t.name].config, where, plan.models[t.index].path)
        self.batch_size, self.max_length = batch_size, max_length

    def outputs(self, target: str, model: torch.nn.Module | None = None) -> np.ndarray:
        """What the built-in metrics read: class probabilities (n, C), or an LM's counted-token log-probs."""
        task = self.tasks[target]
        m = model or self.models[target]
        common = {
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "device": next(m.parameters()).device,
            "progress": False,
        }
        if task.kind == CAUSAL_LM:
            return lm_token_logprobs(
                m, self.tokenizers[target], task.rows, task.text_fields, task.messages_field, **common
            )
        return class_probabilities(m, self.tokenizers[target], task.rows, task.text_fields, **common)

    def from_outputs(self, target: str, outputs: np.ndarray, names: list[str]) -> dict[str, float]:
        """Built-in metrics of one target's outputs."""
        if self.tasks[target].kind == CAUSAL_LM:
            return lm_metrics(outputs, names)
        return classification_metrics(outputs, self.tasks[target].labels, names)

    def score(self, target: str, names: list[str], model: torch.nn.Module | None = None) -> dict[str, float]:
        """{key_name: value} of `names` on a target's task, by its own model (merged tensors loaded) or `model`."""
        m = model or self.models[target]
        builtin = [n for n in names if self.metrics[n].scorer is None]
        out = self.from_outputs(target, self.outputs(target, m), builtin) if builtin else {}
        task = self.tasks[target]
        for n in names:
            if self.metrics[n].scorer is not None:
                m.eval()  # as promised to scorers, whatever an earlier one did
                out[key_name(n)] = call_scorer(self.metrics[n], m, self.tokenizers[target], task.rows)
        return {key_name(n): out[key_name(n)] for n in names}

    def ensemble(self, target: str, outputs: list[np.ndarray], names: list[str]) -> dict[str, float]:
        """Built-in metrics of the output ensemble (equal weights) of several models' outputs on a target's
        task; user scorers need one model, so an ensemble has none."""
        builtin = [n for n in names if self.metrics[n].scorer is None]
        weights = [1.0] * len(outputs)
        if self.tasks[target].kind == CAUSAL_LM:
            return lm_metrics(ensemble_logprobs(outputs, weights), builtin)
        return classification_metrics(ensemble_probabilities(outputs, weights), self.tasks[target].labels, builtin)

    def for_plan(self, plan: MergePlan) -> Scorer:
        """The same targets' models and rows, scoring the merges of another plan (shared, not copied:
        for one caller at a time)."""
        other = copy.copy(self)
        other.plan = plan
        return other

    def copy(self) -> Scorer:
        other = copy.copy(self)
        other.models = {k: copy.deepcopy(v) for k, v in self.models.items()}
        return other


def score_candidate(
    scorer: Scorer, inputs: MergeInputs, weights: list[float], metric: str, params: Strict | None = None
) -> dict:
    """Merge with λ = weights (and the method's `params`, default the plan's) for every target, score each
    on its task; the mean is the candidate's score."""
    plan = scorer.plan if params is None else dataclasses.replace(scorer.plan, params=params)
    per_task, shared = {}, {}
    for t in plan.targets:
        load_state(scorer.models[t.name], merge_in_memory(plan, inputs, weights, t.index, shared))
        per_task[t.name] = scorer.score(t.name, [metric])[key_name(metric)]
    return {
        "weights": [float(w) for w in weights],
        "params": plan.params.model_dump(mode="json"),
        "score": float(np.mean(list(per_task.values()))),
        "per_task": per_task,
    }


def varied_params(search: dict) -> list[str]:
    """The method parameters that differ between a search's candidates (task arithmetic's scale, ...)."""
    cands = search["candidates"]
    names = list(cands[0].get("params", {})) if cands else []
    return [n for n in names if len({repr(c.get("params", {}).get(n)) for c in cands}) > 1]


def searches_lambda(search: dict) -> bool:
    """Whether a search's candidates differ in λ (else only in the method's parameters)."""
    return len({tuple(c["weights"]) for c in search["candidates"]}) > 1


def search(
    scorer: Scorer,
    inputs: MergeInputs,
    lambdas: list[list[float]],
    metric: str,
    workers: int = 1,
    progress: bool = True,
    desc: str = "λ search",
    params: list[Strict] | None = None,
) -> dict:
    """Score every candidate (λ = lambdas[i], with the method's params[i] when given); returns
    {'candidates': [...], 'best': index of the first best}."""
    from fishmerge.merge.executor import run_prepasses

    contexts: dict[str, MergeInputs] = {}

    def inputs_for(p: Strict | None) -> MergeInputs:
        """The inputs with the pre-passes of parameters `p` (TIES's thresholds depend on its density)."""
        if p is None or p == scorer.plan.params:
            return inputs
        key = repr(p.model_dump(mode="json"))
        if key not in contexts:
            ctx = run_prepasses(dataclasses.replace(scorer.plan, params=p))
            contexts[key] = dataclasses.replace(inputs, context=ctx)
        return contexts[key]

    pairs = [(lam, p, inputs_for(p)) for lam, p in zip(lambdas, params or [None] * len(lambdas))]
    bar = tqdm(total=len(pairs), desc=desc, unit="cand", disable=not progress)
    with numpy_small_pages():  # every candidate merged into fresh arrays: see fishmerge.pipeline.huge_pages
        if workers <= 1:
            results = []
            for lam, p, inp in pairs:
                results.append(score_candidate(scorer, inp, lam, metric, p))
                bar.update(1)
        else:
            scorers = [scorer] + [scorer.copy() for _ in range(workers - 1)]
            chunks = [pairs[i::workers] for i in range(workers)]

            def run(i: int) -> list[tuple[int, dict]]:
                out = []
                for j, (lam, p, inp) in enumerate(chunks[i]):
                    out.append((i + j * workers, score_candidate(scorers[i], inp, lam, metric, p)))
                    bar.update(1)
                return out

            with ThreadPoolExecutor(workers) as pool:
                flat = [r for part in pool.map(run, range(workers)) for r in part]
            results = [r for _, r in sorted(flat, key=lambda x: x[0])]
    bar.close()
    scores = [r["score"] for r in results]
    higher = get_metric(metric).higher_is_better
    best = int(np.argmax(scores)) if higher else int(np.argmin(scores))  # the first best either way
    return {"candidates": results, "best": best, "metric": key_name(metric), "higher_is_better": higher}
