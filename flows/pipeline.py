"""Flow `fisher-merge-pipeline`: missing Fishers → λ search → out-of-core merge → evaluation against
the baselines → MLflow run, registration and promotion → report. Flow `promote`: by hand."""

from __future__ import annotations

from fishmerge.errors import FishmergeError
from fishmerge.flows.merge import fishers_for, merge_models
from fishmerge.tasks.pipeline import (
    pipeline_evaluate,
    pipeline_prepare,
    pipeline_report,
    pipeline_search,
    pipeline_track,
    registry_promote,
)
from prefect import flow, get_run_logger
from prefect.states import Failed


@flow(name="fisher-merge-pipeline")
def fisher_merge_pipeline(config: str, progress: bool = False) -> dict | Failed:
    """Run the whole pipeline of a pipeline config (a merge config plus search/evaluate/register/mlflow)."""
    from fishmerge.merge.config import load_merge_config

    log = get_run_logger()
    prep = pipeline_prepare(config)
    if "error" in prep:
        return Failed(message=prep["error"])
    rc = prep["config"]
    cfg = load_merge_config(rc)
    names = [m.name for m in cfg.models]

    fishers, error = fishers_for(rc)
    if error:
        return Failed(message=error)

    searches: dict[str, dict] = {}
    total = sum(m.weight for m in cfg.models)
    weights = [m.weight / total for m in cfg.models]
    iso_weights = weights if cfg.method != "isotropic" else None
    if cfg.search:
        found = pipeline_search(rc, fishers)
        if "error" in found:
            return Failed(message=found["error"])
        searches[cfg.method] = found
        weights = found["candidates"][found["best"]]["weights"]
        log.info("λ search (%s): best %s = %.4f", cfg.method, weights, found["candidates"][found["best"]]["score"])
        wants_iso = cfg.evaluate and "isotropic" in cfg.evaluate.baselines and cfg.method != "isotropic"
        if wants_iso:
            iso = pipeline_search(rc, fishers, "isotropic")
            if "error" in iso:
                return Failed(message=iso["error"])
            searches["isotropic"] = iso
            iso_weights = iso["candidates"][iso["best"]]["weights"]

    merged = merge_models(
        config=rc,
        overwrite=True,
        weights=dict(zip(names, weights)),
        dask_address=cfg.execution.dask_address,
        progress=progress,
        return_state=True,
    )
    if not merged.is_completed():
        return Failed(message=f"merge: {merged.message}")
    summary = merged.result()
    merged_dirs = summary["targets"]

    results: dict = {}
    if cfg.evaluate:
        evaluated = pipeline_evaluate(rc, fishers, weights, iso_weights, merged_dirs)
        if "error" in evaluated:
            return Failed(message=evaluated["error"])
        results = evaluated["results"]

    tracked = pipeline_track(
        rc, prep["config_text"], fishers, weights, searches, results, merged_dirs, prep["tracking_uri"]
    )
    if "error" in tracked:
        return Failed(message=tracked["error"])
    report = pipeline_report(rc, fishers, weights, searches, results, tracked, merged_dirs)
    if "error" in report:
        return Failed(message=report["error"])
    return {
        "output": summary["output"],
        "targets": merged_dirs,
        "weights": dict(zip(names, weights)),
        "isotropic_weights": dict(zip(names, iso_weights)) if iso_weights else None,
        "results": results,
        "run_id": tracked.get("run_id"),
        "decisions": tracked.get("decisions", {}),
        "report": report["report"],
        "fishers": fishers,
    }


@flow(name="promote")
def promote(name: str, version: str | None = None, tracking_uri: str | None = None) -> dict | Failed:
    """Promote a registered version (default: the challenger) to champion by hand."""
    from fishmerge import registry

    out = registry_promote(name, version, registry.tracking_uri(tracking_uri))
    if "error" in out:
        return Failed(message=out["error"])
    return out


def run_pipeline(config: str, progress: bool = False) -> dict:
    """Run the pipeline flow in this process; a failure becomes one FishmergeError."""
    state = fisher_merge_pipeline(config=config, progress=progress, return_state=True)
    if not state.is_completed():
        raise FishmergeError(state.message or f"the pipeline ended {state.type.value}")
    return state.result()
