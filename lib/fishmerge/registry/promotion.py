"""Promotion of registered versions: the decision against the champion (metric, margin, guards), applied idempotently."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fishmerge.errors import FishmergeError
from fishmerge.registry.connection import (
    BEFORE_TAG,
    CHALLENGER,
    CHAMPION,
    DECISION_TAG,
    LINEAGE_TAG,
    METRIC_TAG,
    REASON_TAG,
    quote_filter,
)
from fishmerge.registry.registration import model_version


def _require(metrics: Mapping[str, float], names: list[str], whose: str) -> None:
    missing = [n for n in names if n not in metrics]
    if missing:
        raise FishmergeError(
            f"{whose} metrics lack {missing}: it has {sorted(metrics) or 'none'}; fix the promotion metric/guard "
            "names or evaluate those metrics"
        )


def _higher_is_better(key: str, directions: Mapping[str, bool] | None) -> bool:
    """A metric key's direction: as given (by its full key or its metric name), else a built-in's."""
    from fishmerge.pipeline.metrics import metric_of_key

    directions = directions or {}
    name = key.rsplit("/", 1)[-1]
    for k in (key, name):
        if k in directions:
            return bool(directions[k])
    return metric_of_key(key).higher_is_better


def decide_promotion(
    new: Mapping[str, float],
    champion: Mapping[str, float] | None,
    metric: str,
    min_delta: float = 0.0,
    guard: Mapping[str, float] | None = None,
    directions: Mapping[str, bool] | None = None,
) -> tuple[bool, str]:
    """Promote iff new[metric] is better than champion[metric] by at least min_delta and, per guarded
    metric g with tolerance tol (negative = allowed worsening), new[g] is better than champion[g] by at
    least tol. "Better" follows each metric's direction (`directions` {key or metric name: higher is
    better}, else the built-in metric's: higher accuracy/f1, lower nll/perplexity). No champion: promote.
    The reason names the numbers."""
    guard = dict(guard or {})
    _require(new, [metric, *guard], "the new model's")
    bad = {k: new[k] for k in [metric, *guard] if not math.isfinite(float(new[k]))}
    if bad:
        return False, f"the new model's {', '.join(f'{k}={v}' for k, v in bad.items())} is not finite: never promoted"
    higher = {k: _higher_is_better(k, directions) for k in [metric, *guard]}

    def by(k: str) -> float:  # how much better the new value is (negative: worse)
        return new[k] - champion[k] if higher[k] else champion[k] - new[k]

    def arrow(k: str) -> str:
        return "higher" if higher[k] else "lower"

    if champion is None:
        return True, f"no champion yet: promoted with {metric}={new[metric]:.6g}"
    _require(champion, [metric, *guard], "the champion's")
    broken = [k for k in [metric, *guard] if math.isnan(float(champion[k]))]
    if broken:  # a champion that cannot be compared is replaced by one that can
        return True, f"the champion's {', '.join(broken)} is NaN: promoted with {metric}={new[metric]:.6g}"
    if by(metric) < min_delta:
        return False, (
            f"{metric} {new[metric]:.6g} vs champion {champion[metric]:.6g}: better by {by(metric):+.6g} "
            f"< min_delta {min_delta:g} ({arrow(metric)} is better)"
        )
    held = []
    for g, tol in guard.items():
        if by(g) < tol:
            return False, (
                f"guard {g} broken: {new[g]:.6g} vs champion {champion[g]:.6g}: better by {by(g):+.6g} "
                f"< tolerance {tol:+g} ({arrow(g)} is better)"
            )
        held.append(f"{g} better by {by(g):+.6g} ≥ {tol:+g}")
    reason = (
        f"{metric} {new[metric]:.6g} vs champion {champion[metric]:.6g}: better by {by(metric):+.6g} "
        f"≥ min_delta {min_delta:g} ({arrow(metric)} is better)"
    )
    return True, reason + (f"; guards held: {', '.join(held)}" if held else "")


def _metrics_of(tags: Mapping[str, str]) -> dict[str, float]:
    return {k[len(METRIC_TAG) :]: float(v) for k, v in tags.items() if k.startswith(METRIC_TAG)}


def _aliases(name: str) -> dict[str, str]:
    """alias -> version of a registered model."""
    try:
        return {a: str(v) for a, v in MlflowClient().get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        raise FishmergeError(f"no registered model '{name}' at {mlflow.get_tracking_uri()}: {exc.message}") from exc


def _policy(policy: Any, key: str, default: Any) -> Any:
    if isinstance(policy, Mapping):
        return policy.get(key, default)
    return getattr(policy, key, default)


def apply_promotion(
    name: str,
    version: str | int,
    metrics: Mapping[str, float],
    policy: Any,
    directions: Mapping[str, bool] | None = None,
) -> dict:
    """Record `metrics` on the version (tags metric.<name>), compare with the champion's tags, move
    `champion` only when promoting, and tag the version with the decision, reason and champion before.

    policy: a mapping or object with `metric`, `min_delta` (default 0) and `guard` ({metric: tolerance}).
    directions: {metric key or name: higher is better} for metrics that are not built in (user scorers).
    """
    client = MlflowClient()
    version = str(version)
    model_version(name, version)
    metric = _policy(policy, "metric", None)
    if not metric:
        raise FishmergeError("the promotion policy names no metric: set promotion.metric (e.g. accuracy)")
    min_delta = float(_policy(policy, "min_delta", 0.0) or 0.0)
    guard = dict(_policy(policy, "guard", None) or {})
    for k, v in metrics.items():
        client.set_model_version_tag(name, version, METRIC_TAG + k, repr(float(v)))
    # The champion this decision is judged against is recorded first, so a decision interrupted by a
    # kill is made again against the same champion on rerun (idempotent), even after the alias moved.
    # (Only while the champion is still that one, or this version itself: a newer champion promoted
    # meanwhile is judged against afresh, so `champion` never moves back past it.)
    tags_now = model_version(name, version).tags
    current = _aliases(name).get(CHAMPION)
    recorded = tags_now.get(BEFORE_TAG)
    recorded = None if recorded in (None, "none") else recorded
    if BEFORE_TAG in tags_now and DECISION_TAG not in tags_now and current in (recorded, version):
        before = recorded
    else:
        before = current
        client.set_model_version_tag(name, version, BEFORE_TAG, before or "none")
    if before == version:
        promote_it, decision, reason = False, "already_champion", f"version {version} is already the champion"
    else:
        champ = _metrics_of(model_version(name, before).tags) if before else None
        promote_it, reason = decide_promotion(dict(metrics), champ, metric, min_delta, guard, directions)
        decision = "promoted" if promote_it else "rejected"
        if promote_it:
            client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, REASON_TAG, reason)
    client.set_model_version_tag(name, version, DECISION_TAG, decision)  # last: the registration is complete
    return {
        "version": version,
        "decision": decision,
        "promoted": promote_it,
        "reason": reason,
        "champion_before": before,
        "champion_after": version if promote_it else before,
    }


def promote(name: str, version: str | int | None = None) -> dict:
    """Make `version` (default: the `challenger`) the champion by hand, recorded in its tags."""
    aliases = _aliases(name)
    if version is None:
        if CHALLENGER not in aliases:
            raise FishmergeError(f"model '{name}' has no '{CHALLENGER}' alias: name the version to promote")
        version = aliases[CHALLENGER]
    version = str(version)
    model_version(name, version)
    before = aliases.get(CHAMPION)
    client = MlflowClient()
    client.set_registered_model_alias(name, CHAMPION, version)
    reason = f"promoted by hand (champion before: {before or 'none'})"
    for k, v in {DECISION_TAG: "promoted_by_hand", REASON_TAG: reason, BEFORE_TAG: before or "none"}.items():
        client.set_model_version_tag(name, version, k, v)
    return {"version": version, "decision": "promoted_by_hand", "reason": reason, "champion_before": before}


def history(name: str) -> list[dict]:
    """Every version of `name`, newest first: aliases, metrics, lineage, decision, created, run id."""
    by_version: dict[str, list[str]] = {}
    for alias, v in _aliases(name).items():
        by_version.setdefault(v, []).append(alias)
    versions = MlflowClient().search_model_versions(f"name = '{quote_filter(name, 'model name')}'")
    out = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        out.append(
            {
                "version": str(v.version),
                "aliases": sorted(by_version.get(str(v.version), [])),
                "metrics": _metrics_of(v.tags),
                "lineage": v.tags.get(LINEAGE_TAG),
                "decision": v.tags.get(DECISION_TAG),
                "reason": v.tags.get(REASON_TAG),
                "created": datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
                "run_id": v.run_id,
                "tags": dict(v.tags),
            }
        )
    return out
