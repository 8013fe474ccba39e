"""Prefect tasks of the pipeline: thin wrappers over lib (they call the core and create artifacts).

The config is read and validated once, by pipeline-prepare; every later task gets the validated
MergeConfig (and the merge's own plan). Bad input raises FishmergeError, never retried
(fishmerge.tasks.not_bad_input); the flow turns it into one failure.
"""

from __future__ import annotations

import re

from fishmerge.merge.config import MergeConfig
from fishmerge.merge.plan import MergePlan
from fishmerge.tasks import not_bad_input
from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="pipeline-prepare", cache_policy=NO_CACHE)
def pipeline_prepare(config: str, run_root: str = "./.fishmerge/runs") -> dict:
    """Validate the config, check MLflow first (bounded retries), resolve `models:/Name@alias` inputs
    to local folders: {'config': the validated MergeConfig, 'config_text', 'tracking_uri', 'record':
    the resolved config written as a record (nothing reads it back)}."""
    import hashlib
    from pathlib import Path

    import yaml
    from fishmerge import registry
    from fishmerge.errors import FishmergeError
    from fishmerge.io import storage
    from fishmerge.merge.config import load_merge_config, resolve_model_refs
    from fishmerge.pipeline.baselines import check_scorers, check_task_data, settle_metrics

    text = Path(config).read_text() if Path(config).is_file() else ""
    cfg = load_merge_config(config)
    missing = [t for t in cfg.target_names if not next(m for m in cfg.models if m.name == t).data]
    if (cfg.search or cfg.evaluate) and missing:
        raise FishmergeError(f"targets {missing} have no `data:`: λ search and evaluation need each target's task data")
    uri = registry.tracking_uri(cfg.mlflow.tracking_uri)
    registry.check_reachable(uri)
    registry.use_experiment(cfg.mlflow.experiment or cfg.name, uri)
    root = Path(storage.normalize(run_root))
    resolve_model_refs(cfg, root / "registry")  # hub ids and models:/ URIs as local folders
    if cfg.search or cfg.evaluate:  # metrics by the targets' kind, their data and scorers: checked before any work
        settle_metrics(cfg)
        check_task_data(cfg)
        check_scorers(cfg)
    record = root / f"{cfg.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return {"config": cfg, "config_text": text, "tracking_uri": uri, "record": str(record)}


@task(name="pipeline-search", cache_policy=NO_CACHE)
def pipeline_search(cfg: MergeConfig, fishers: dict[str, str], method: str | None = None) -> dict:
    """Validation search (cached by content): every candidate merged in memory and scored on the search split."""
    from fishmerge.pipeline.baselines import cached_search

    return cached_search(cfg, fishers, method)


@task(name="pipeline-evaluate", cache_policy=NO_CACHE)
def pipeline_evaluate(
    cfg: MergeConfig, fishers: dict[str, str], plan: MergePlan, compared: dict[str, dict], merged_dirs: dict[str, str]
) -> dict:
    """Merged models, the methods they are compared with and the references on each task's evaluation
    split (cached by content)."""
    from fishmerge.pipeline.baselines import cached_evaluation

    return cached_evaluation(cfg, fishers, plan, compared, merged_dirs)


@task(name="pipeline-track", retries=2, retry_delay_seconds=3, retry_condition_fn=not_bad_input, cache_policy=NO_CACHE)
def pipeline_track(
    cfg: MergeConfig,
    config_text: str,
    plan: MergePlan,
    searches: dict,
    results: dict,
    merged_dirs: dict[str, str],
    tracking_uri: str,
) -> dict:
    """The MLflow run (nested candidate runs), registration of each target, promotion decisions."""
    from fishmerge import registry
    from fishmerge.registry.tracking import log_pipeline_run

    registry.check_reachable(tracking_uri)
    return log_pipeline_run(cfg, config_text, plan, searches, results, merged_dirs, tracking_uri)


@task(name="pipeline-report", cache_policy=NO_CACHE)
def pipeline_report(
    cfg: MergeConfig,
    fishers: dict[str, str],
    weights: list[float],
    searches: dict,
    results: dict,
    tracked: dict,
    merged_dirs: dict[str, str],
) -> dict:
    """report.md and PNGs beside the merged folders, Prefect markdown + table artifacts, MLflow artifacts."""
    from fishmerge.pipeline.report import write_pipeline_report
    from fishmerge.registry.tracking import log_report
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    report = write_pipeline_report(cfg, fishers, weights, searches, results, tracked, merged_dirs)
    create_markdown_artifact(
        key=_artifact_key(cfg.name, "report"),
        markdown=report["artifact_markdown"],
        description="fishmerge pipeline report",
    )
    for label, rows in report["tables"].items():
        create_table_artifact(
            key=_artifact_key(cfg.name, f"lambda-{label}"), table=rows, description=f"λ candidates ({label})"
        )
    if tracked.get("run_id"):
        log_report(tracked["run_id"], [report["report"], *report["plots"]])
    return {"report": report["report"], "plots": report["plots"], "markdown": report["markdown"]}


def _artifact_key(name: str, what: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower()).strip("-")


@task(name="registry-promote")
def registry_promote(name: str, version: str | None, tracking_uri: str) -> dict:
    """Make a version (default: the challenger) the champion by hand."""
    from fishmerge import registry

    registry.check_reachable(tracking_uri)
    registry.use_experiment("fishmerge-promotions", tracking_uri)
    return registry.promote(name, version)
