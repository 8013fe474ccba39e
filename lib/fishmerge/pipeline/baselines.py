"""The pipeline's λ search and evaluation, cached by content: merged models against the baselines,
on each target's own task.

Merged outputs and baselines are evaluated (and cached) apart: the baselines read no Fisher, so
every Fisher variant of a merge shares them. Baselines: `originals` (each fine-tuned target model
alone), `isotropic` (plain λ-weighted average, with its own λ search), `ensemble` (output
ensembling: the average of the class probabilities that every model's body gives under the
target's head, equal weights). Metric keys are `<task>/<metric>`, e.g. `rte/accuracy`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from fishmerge import __version__
from fishmerge.io import storage
from fishmerge.merge.config import MergeConfig
from fishmerge.merge.methods import get_method
from fishmerge.merge.plan import MergePlan, plan_for
from fishmerge.pipeline.evaluation import ensemble_probabilities
from fishmerge.pipeline.search import MergeInputs, Scorer, candidates, load_inputs, load_state, merge_in_memory, search

CACHE_ROOT = "./.fishmerge/cache"
ISOTROPIC = "isotropic"  # the baseline's name in `evaluate.baselines` and in the pipeline's searches
BASELINE_METHOD = "isotropic"  # the merge method of the isotropic baseline (the one place it is named)


def isotropic_plan(plan: MergePlan) -> MergePlan:
    """The same merge with plain averaging (the isotropic baseline; it reads no base model)."""
    method = get_method(BASELINE_METHOD)
    return dataclasses.replace(plan, method=method.name, params=method.Params(), base=None, base_keys={})


def baseline_is_the_merge(cfg: MergeConfig) -> bool:
    """The merge itself is the isotropic baseline's method: the baseline would repeat it."""
    return cfg.method == BASELINE_METHOD


def needs_baseline_search(cfg: MergeConfig) -> bool:
    """The isotropic baseline is evaluated with λ of its own search (a search, the baseline asked for,
    and a merge method other than the baseline's)."""
    return bool(cfg.search and cfg.evaluate and ISOTROPIC in cfg.evaluate.baselines) and not baseline_is_the_merge(cfg)


def baseline_weights(cfg: MergeConfig) -> list[float] | None:
    """λ of the isotropic baseline without a search of its own: the config's, as the baseline's method
    uses them; None when the merge is itself isotropic (nothing to compare)."""
    if baseline_is_the_merge(cfg):
        return None
    return [float(w) for w in get_method(BASELINE_METHOD).check_weights([m.weight for m in cfg.models])]


def _recorder(scorer: Scorer, metrics: list[str], out: dict[str, dict[str, float]]):
    def record(kind: str, target: str, probs: np.ndarray) -> None:
        for k, v in scorer.metrics(target, probs, metrics).items():
            out.setdefault(kind, {})[f"{target}/{k}"] = v

    return record


def _device_of(scorer: Scorer, target: str) -> str:
    return str(next(scorer.models[target].parameters()).device)


def evaluate_merged(scorer: Scorer, merged_dirs: dict[str, str], metrics: list[str]) -> dict[str, dict[str, float]]:
    """{'merged': {'<task>/<metric>': value}}: each merged output folder on its target's task."""
    from fishmerge.io.checkpoint import load_model

    out: dict[str, dict[str, float]] = {"merged": {}}
    record = _recorder(scorer, metrics, out)
    for t in scorer.plan.targets:
        merged, _ = load_model(merged_dirs[t.name], device=_device_of(scorer, t.name))
        record("merged", t.name, scorer.probabilities(t.name, merged))
        del merged
    return out


def evaluate_baselines(
    scorer: Scorer,
    inputs: MergeInputs,
    isotropic_weights: list[float] | None,
    metrics: list[str],
    baselines: list[str],
) -> dict[str, dict[str, float]]:
    """{'originals'|'isotropic'|'ensemble': {'<task>/<metric>': value}}; none of them reads a Fisher."""
    from fishmerge.io.checkpoint import load_model

    plan = scorer.plan
    out: dict[str, dict[str, float]] = {b: {} for b in baselines}
    record = _recorder(scorer, metrics, out)
    for t in plan.targets:
        if "originals" in baselines:
            original, _ = load_model(plan.models[t.index].path, device=_device_of(scorer, t.name))
            record("originals", t.name, scorer.probabilities(t.name, original))
            del original
        if ISOTROPIC in baselines and isotropic_weights is not None:
            load_state(scorer.models[t.name], merge_in_memory(isotropic_plan(plan), inputs, isotropic_weights, t.index))
            record(ISOTROPIC, t.name, scorer.probabilities(t.name))
        if "ensemble" in baselines:
            probs = []
            for theta in inputs.thetas:  # every model's body under this target's head
                load_state(scorer.models[t.name], theta)
                probs.append(scorer.probabilities(t.name))
            record("ensemble", t.name, ensemble_probabilities(probs, [1.0] * len(probs)))
    return out


def content_key(plan: MergePlan, kind: str, extra: dict) -> str:
    """A cache key for search/evaluation results: the inputs (by content) and parameters the method
    reads, and the settings. Isotropic results are shared by every Fisher variant of a merge."""
    method = plan.merge_method
    key = {
        "kind": kind,
        "version": __version__,
        "method": plan.method,
        "options": plan.params.model_dump(mode="json"),
        "models": [[m.name, m.fingerprint, m.fisher_id if method.needs_fisher else None] for m in plan.models],
        "base": plan.base.fingerprint if plan.base and method.needs_base else None,
        "targets": [t.name for t in plan.targets],
        **extra,
    }
    return kind + "-" + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached(key: str, compute, root: str = CACHE_ROOT):
    """Results computed once per content key (JSON beside the other fishmerge state)."""
    path = storage.join(storage.normalize(root), f"{key}.json")
    found = storage.read_json(path)
    if found is not None:
        return found, True
    value = compute()
    storage.write_json(path, value)
    return value, False


def data_fingerprints(scorer: Scorer) -> dict[str, str]:
    """Hashes of the rows each task is scored on (cache keys change when the data does)."""
    return {
        name: hashlib.sha256(
            json.dumps([task.rows, task.labels.tolist()], sort_keys=True, default=str).encode()
        ).hexdigest()[:20]
        for name, task in scorer.tasks.items()
    }


def cached_search(cfg: MergeConfig, fishers: dict[str, str], method: str | None = None) -> dict:
    """The λ search of `cfg` (with its method, or `method`: a baseline's), computed once per content key:
    {'candidates', 'best', 'metric', 'method', 'cached', 'names'}."""
    s = cfg.search
    plan = plan_for(cfg, fishers, method=method, check_output=False)
    ev = cfg.evaluate
    scorer = Scorer(cfg, plan, s.split, s.limit, cfg.execution.device, *((ev.batch_size, ev.max_length) if ev else ()))
    lambdas = candidates(len(plan.models), s.strategy, s.points, s.seed)
    scoring = {"max_length": scorer.max_length, "device": cfg.execution.device}  # what can change a score
    key = content_key(
        plan,
        "search",
        {"search": s.model_dump(), "scoring": scoring, "data": data_fingerprints(scorer), "lambdas": lambdas},
    )

    def compute():
        inputs = load_inputs(plan)
        return search(scorer, inputs, lambdas, s.metric, s.workers, progress=True, desc=f"λ search ({plan.method})")

    result, hit = cached(key, compute)
    return {**result, "method": plan.method, "cached": hit, "names": [m.name for m in plan.models]}


def cached_evaluation(
    cfg: MergeConfig, plan: MergePlan, isotropic_weights: list[float] | None, merged_dirs: dict[str, str]
) -> dict:
    """The merged outputs of `plan` and the baselines on each task's evaluation split, each computed once
    per content key: {'results': {kind: {'<task>/<metric>': value}}, 'cached'}."""
    ev = cfg.evaluate
    scorer = Scorer(cfg, plan, ev.split, ev.limit, cfg.execution.device, ev.batch_size, ev.max_length)
    settings = {"evaluate": ev.model_dump(), "data": data_fingerprints(scorer)}
    merged_key = content_key(plan, "evaluate-merged", {"plan": plan.plan_id, **settings})
    merged, merged_hit = cached(merged_key, lambda: evaluate_merged(scorer, merged_dirs, list(ev.metrics)))
    baseline_plan = isotropic_plan(plan)  # what the baselines depend on: models and data, no Fisher
    base_key = content_key(baseline_plan, "evaluate-baselines", {"iso": isotropic_weights, **settings})
    baselines, base_hit = cached(
        base_key,
        lambda: evaluate_baselines(
            scorer, load_inputs(baseline_plan), isotropic_weights, list(ev.metrics), list(ev.baselines)
        ),
    )
    return {"results": {**merged, **baselines}, "cached": merged_hit and base_hit}
