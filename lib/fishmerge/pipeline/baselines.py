"""The pipeline's evaluation: merged models against the baselines, on each target's own task.

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
from fishmerge.merge.plan import MergePlan
from fishmerge.pipeline.evaluation import ensemble_probabilities
from fishmerge.pipeline.search import MergeInputs, Scorer, load_state, merge_in_memory

CACHE_ROOT = "./.fishmerge/cache"


def isotropic_plan(plan: MergePlan) -> MergePlan:
    """The same merge with plain averaging (the isotropic baseline; it reads no base model)."""
    return dataclasses.replace(plan, method="isotropic", base=None, base_keys={})


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
        if "isotropic" in baselines and isotropic_weights is not None:
            load_state(scorer.models[t.name], merge_in_memory(isotropic_plan(plan), inputs, isotropic_weights, t.index))
            record("isotropic", t.name, scorer.probabilities(t.name))
        if "ensemble" in baselines:
            probs = []
            for theta in inputs.thetas:  # every model's body under this target's head
                load_state(scorer.models[t.name], theta)
                probs.append(scorer.probabilities(t.name))
            record("ensemble", t.name, ensemble_probabilities(probs, [1.0] * len(probs)))
    return out


def content_key(plan: MergePlan, kind: str, extra: dict) -> str:
    """A cache key for search/evaluation results: the inputs (by content) and options the method reads,
    and the settings. Isotropic results are shared by every Fisher variant of a merge."""
    method = plan.merge_method
    key = {
        "kind": kind,
        "version": __version__,
        "method": plan.method,
        "options": {name: getattr(plan.options, name) for name in method.options_used},
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
