"""The pipeline's evaluation: merged models against the baselines, on each target's own task.

Baselines: `originals` (each fine-tuned target model alone), `isotropic` (plain λ-weighted
average, with its own λ search), `ensemble` (output ensembling: the average of the class
probabilities that every model's body gives under the target's head, equal weights). Metric
keys are `<task>/<metric>`, e.g. `rte/accuracy`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from lib import __version__, storage
from lib.evaluate import ensemble_probabilities
from lib.merge_plan import MergePlan
from lib.merge_search import MergeInputs, Scorer, load_state, merge_in_memory

CACHE_ROOT = "./.fishmerge/cache"


def isotropic_plan(plan: MergePlan) -> MergePlan:
    """The same merge with plain averaging (the isotropic baseline)."""
    return dataclasses.replace(plan, method="isotropic")


def evaluate_merge(
    scorer: Scorer,
    inputs: MergeInputs,
    merged_dirs: dict[str, str],
    isotropic_weights: list[float] | None,
    metrics: list[str],
    baselines: list[str],
) -> dict[str, dict[str, float]]:
    """{'merged'|'originals'|'isotropic'|'ensemble': {'<task>/<metric>': value}} on the scorer's split."""
    from lib.checkpoint import load_model

    out: dict[str, dict[str, float]] = {b: {} for b in ["merged", *baselines]}
    plan = scorer.plan
    for t in plan.targets:

        def record(kind: str, probs: np.ndarray, target: str = t.name) -> None:
            for k, v in scorer.metrics(target, probs, metrics).items():
                out[kind][f"{target}/{k}"] = v

        if "originals" in baselines:  # before any merged state is loaded into the scorer's models
            original, _ = load_model(
                plan.models[t.index].path, device=str(next(scorer.models[t.name].parameters()).device)
            )
            record("originals", scorer.probabilities(t.name, original))
            del original
        merged, _ = load_model(merged_dirs[t.name], device=str(next(scorer.models[t.name].parameters()).device))
        record("merged", scorer.probabilities(t.name, merged))
        del merged
        if "isotropic" in baselines and isotropic_weights is not None:
            load_state(scorer.models[t.name], merge_in_memory(isotropic_plan(plan), inputs, isotropic_weights, t.index))
            record("isotropic", scorer.probabilities(t.name))
        if "ensemble" in baselines:
            probs = []
            for theta in inputs.thetas:  # every model's body under this target's head
                load_state(scorer.models[t.name], theta)
                probs.append(scorer.probabilities(t.name))
            record("ensemble", ensemble_probabilities(probs, [1.0] * len(probs)))
    return out


def content_key(plan: MergePlan, kind: str, extra: dict) -> str:
    """A cache key for search/evaluation results: inputs by content, method and options, settings."""
    o = plan.options
    key = {
        "kind": kind,
        "version": __version__,
        "method": plan.method,
        "options": [o.floor, o.favor_target, o.normalize, o.scale, o.density],
        "models": [[m.name, m.fingerprint, m.fisher_id] for m in plan.models],
        "base": plan.base.fingerprint if plan.base else None,
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
