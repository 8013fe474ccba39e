"""Prefect tasks of the pipeline: thin wrappers over lib (JSON in, JSON out).

Bad input (FishmergeError) comes back as {'error': message}; the flow turns it into one failure.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fishmerge.errors import FishmergeError
from prefect import task


def _errors_as_result(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FishmergeError as exc:
            return {"error": str(exc)}

    return wrapper


@task(name="pipeline-prepare")
@_errors_as_result
def pipeline_prepare(config: str, run_root: str = "./.fishmerge/runs") -> dict:
    """Validate the config, check MLflow first (bounded retries), resolve `models:/Name@alias` inputs
    to local folders, and write the resolved config (absolute paths) that every later step reads."""
    import hashlib

    import yaml
    from fishmerge import registry
    from fishmerge.io import storage
    from fishmerge.merge.config import load_merge_config

    text = Path(config).read_text() if Path(config).exists() else ""
    cfg = load_merge_config(config)
    missing = [t for t in cfg.target_names if not next(m for m in cfg.models if m.name == t).data]
    if (cfg.search or cfg.evaluate) and missing:
        raise FishmergeError(f"targets {missing} have no `data:`: λ search and evaluation need each target's task data")
    uri = registry.tracking_uri(cfg.mlflow.tracking_uri)
    registry.check_reachable(uri)
    registry.use_experiment(cfg.mlflow.experiment or cfg.name, uri)
    root = Path(storage.normalize(run_root))
    for m in cfg.models:
        if m.path.startswith("models:/"):
            ref = m.path.removeprefix("models:/")
            name, _, alias = ref.partition("@") if "@" in ref else ref.partition("/")
            m.path = str(
                registry.download_model_dir(name, alias or "champion", root / "registry" / name / (alias or "champion"))
            )
    resolved = root / f"{cfg.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    resolved.parent.mkdir(parents=True, exist_ok=True)
    data = cfg.model_dump(mode="json")
    resolved.write_text(yaml.safe_dump(data, sort_keys=False))
    return {"config": str(resolved), "config_text": text, "tracking_uri": uri}


@task(name="pipeline-search")
@_errors_as_result
def pipeline_search(config: str, fishers: dict[str, str], method: str | None = None) -> dict:
    """λ search (cached by content): every candidate merged in memory and scored on the search split."""
    from fishmerge.merge.config import load_merge_config
    from fishmerge.merge.plan import plan_from_config
    from fishmerge.pipeline.baselines import cached, content_key, data_fingerprints
    from fishmerge.pipeline.search import Scorer, candidates, load_inputs, search

    cfg = load_merge_config(config)
    s = cfg.search
    plan = plan_from_config(config, fishers, method=method, check_output=False)
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


@task(name="pipeline-evaluate")
@_errors_as_result
def pipeline_evaluate(
    config: str,
    fishers: dict[str, str],
    weights: list[float],
    isotropic_weights: list[float] | None,
    merged_dirs: dict[str, str],
) -> dict:
    """Merged models and baselines on each task's evaluation split (cached by content)."""
    from fishmerge.merge.config import load_merge_config
    from fishmerge.merge.plan import plan_from_config
    from fishmerge.pipeline.baselines import (
        cached,
        content_key,
        data_fingerprints,
        evaluate_baselines,
        evaluate_merged,
        isotropic_plan,
    )
    from fishmerge.pipeline.search import Scorer, load_inputs

    cfg = load_merge_config(config)
    ev = cfg.evaluate
    plan = plan_from_config(config, fishers, weights=weights, check_output=False)
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


@task(name="pipeline-track", retries=2, retry_delay_seconds=3)
@_errors_as_result
def pipeline_track(
    config: str,
    config_text: str,
    fishers: dict[str, str],
    weights: list[float],
    searches: dict,
    results: dict,
    merged_dirs: dict[str, str],
    tracking_uri: str,
) -> dict:
    """The MLflow run (nested candidate runs), registration of each target, promotion decisions."""
    from fishmerge import registry
    from fishmerge.merge.config import load_merge_config
    from fishmerge.merge.plan import plan_from_config
    from fishmerge.registry.tracking import log_pipeline_run

    cfg = load_merge_config(config)
    registry.check_reachable(tracking_uri)
    plan = plan_from_config(config, fishers, weights=weights, check_output=False)
    return log_pipeline_run(
        cfg, config_text or Path(config).read_text(), plan, searches, results, merged_dirs, tracking_uri
    )


@task(name="pipeline-report")
@_errors_as_result
def pipeline_report(
    config: str,
    fishers: dict[str, str],
    weights: list[float],
    searches: dict,
    results: dict,
    tracked: dict,
    merged_dirs: dict[str, str],
) -> dict:
    """report.md and PNGs beside the merged folders, Prefect markdown + table artifacts, MLflow artifacts."""
    from fishmerge.fisher.report import plot_layer_mass, tensor_stats
    from fishmerge.io import storage
    from fishmerge.merge.config import load_merge_config
    from fishmerge.pipeline.report import plot_lambda_curve, plot_task_bars, report_markdown
    from fishmerge.registry.tracking import log_report
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    cfg = load_merge_config(config)
    out = Path(cfg.output)
    names = [m.name for m in cfg.models]
    plots = []
    if searches:
        plots.append(str(plot_lambda_curve(searches, names, out / "lambda_curve.png")))
    metric = cfg.evaluate.metrics[0] if cfg.evaluate else "accuracy"
    if results.get("merged"):
        plots.append(str(plot_task_bars(results, metric, out / "tasks.png")))
    for name, uri in fishers.items():
        plots.append(plot_layer_mass(tensor_stats(uri), f"Fisher of {name}", str(out / f"fisher_mass_{name}.png")))
    md = report_markdown(
        cfg.name, cfg.method, names, weights, results, searches, tracked.get("decisions", {}), merged_dirs, plots
    )
    (out / "report.md").write_text(md)
    summary = {
        "name": cfg.name,
        "method": cfg.method,
        "weights": dict(zip(names, weights)),
        "results": results,
        "searches": searches,
        "decisions": tracked.get("decisions", {}),
        "fishers": fishers,
        "run_id": tracked.get("run_id"),
    }
    storage.write_json(str(out / "pipeline.json"), summary)
    create_markdown_artifact(
        key=_artifact_key(cfg.name, "report"), markdown=md, description="fishmerge pipeline report"
    )
    for label, s in searches.items():
        rows = [
            {
                "candidate": i,
                **{f"lambda_{n}": round(w, 4) for n, w in zip(names, c["weights"])},
                s["metric"]: round(c["score"], 4),
                "best": i == s["best"],
            }
            for i, c in enumerate(s["candidates"])
        ]
        create_table_artifact(
            key=_artifact_key(cfg.name, f"lambda-{label}"), table=rows, description=f"λ candidates ({label})"
        )
    if tracked.get("run_id"):
        log_report(tracked["run_id"], [str(out / "report.md"), *plots])
    return {"report": str(out / "report.md"), "plots": plots, "markdown": md}


def _artifact_key(name: str, what: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower()).strip("-")


@task(name="registry-promote")
@_errors_as_result
def registry_promote(name: str, version: str | None, tracking_uri: str) -> dict:
    """Make a version (default: the challenger) the champion by hand."""
    from fishmerge import registry

    registry.check_reachable(tracking_uri)
    registry.use_experiment("fishmerge-promotions", tracking_uri)
    return registry.promote(name, version)
