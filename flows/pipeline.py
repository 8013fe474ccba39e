"""Flow `fisher-merge-pipeline`: missing Fishers → λ search → out-of-core merge → evaluation against
the baselines → MLflow run, registration and promotion → report. Flow `promote`: by hand.

The config is read and validated once (pipeline-prepare); the validated MergeConfig travels down
the flow, and the merge's own plan (made once, in the merge-models subflow) goes to the evaluation
and the MLflow run.
"""

from __future__ import annotations

from fishmerge.errors import FishmergeError
from fishmerge.flows.merge import fishers_for, merge_validated
from fishmerge.merge.methods import get_method
from fishmerge.pipeline.baselines import best_choice, compared_methods, configured_choice
from fishmerge.tasks import fails_on_bad_input
from fishmerge.tasks.pipeline import (
    pipeline_evaluate,
    pipeline_prepare,
    pipeline_report,
    pipeline_search,
    pipeline_track,
    registry_promote,
)
from prefect import flow, get_run_logger


@flow(name="fisher-merge-pipeline")
@fails_on_bad_input
def fisher_merge_pipeline(config: str, progress: bool = False) -> dict:
    """Run the whole pipeline of a pipeline config (a merge config plus search/evaluate/register/mlflow)."""
    log = get_run_logger()
    prep = pipeline_prepare(config)
    cfg = prep["config"]
    names = [m.name for m in cfg.models]
    fishers = fishers_for(cfg)

    searches: dict[str, dict] = {}
    # λ as the merge itself uses them (normalised only by methods that normalise), as `fishmerge merge` does
    weights = [float(w) for w in get_method(cfg.method).check_weights([m.weight for m in cfg.models])]
    compared = {name: configured_choice(cfg, name) for name in compared_methods(cfg)}
    if cfg.search:
        found = pipeline_search(cfg, fishers)
        searches[cfg.method] = found
        for name in compared:
            searches[name] = pipeline_search(cfg, fishers, name)
            compared[name] = best_choice(searches[name])
        chosen = best_choice(found)
        weights = chosen["weights"]
        cfg = cfg.with_params(cfg.method, chosen["params"])  # what the search chose (e.g. TIES's scale)
        log.info("search (%s): best %s = %.4f", cfg.method, chosen, found["candidates"][found["best"]]["score"])

    merged = merge_validated(
        cfg=cfg,
        fishers=fishers,
        weights=dict(zip(names, weights)),
        overwrite=True,
        dask_address=cfg.execution.dask_address,
        progress=progress,
        return_state=True,
    )
    if not merged.is_completed():
        raise FishmergeError(f"merge: {merged.message}")
    summary = merged.result()
    plan, merged_dirs = summary["plan"], summary["targets"]

    results: dict = {}
    if cfg.evaluate:
        results = pipeline_evaluate(cfg, fishers, plan, compared, merged_dirs)["results"]

    tracked = pipeline_track(cfg, prep["config_text"], plan, searches, results, merged_dirs, prep["tracking_uri"])
    report = pipeline_report(cfg, fishers, plan.weights, searches, results, tracked, merged_dirs)
    return {
        "output": summary["output"],
        "targets": merged_dirs,
        "weights": dict(zip(names, plan.weights)),
        "compared": {m: {**c, "weights": dict(zip(names, c["weights"]))} for m, c in compared.items()},
        "results": results,
        "run_id": tracked.get("run_id"),
        "decisions": tracked.get("decisions", {}),
        "report": report["report"],
        "fishers": fishers,
    }


@flow(name="promote")
@fails_on_bad_input
def promote(name: str, version: str | None = None, tracking_uri: str | None = None) -> dict:
    """Promote a registered version (default: the challenger) to champion by hand."""
    from fishmerge import registry

    return registry_promote(name, version, registry.tracking_uri(tracking_uri))


def run_pipeline(config: str, progress: bool = False) -> dict:
    """Run the pipeline flow in this process; a failure becomes one FishmergeError."""
    state = fisher_merge_pipeline(config=config, progress=progress, return_state=True)
    if not state.is_completed():
        raise FishmergeError(state.message or f"the pipeline ended {state.type.value}")
    return state.result()
