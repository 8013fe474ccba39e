"""Flow `merge-models`: estimate missing Fishers (the estimate-fisher subflow, cached ones reused),
plan, merge out of core with Dask, report. Threads in the task by default, or a Dask cluster."""

from __future__ import annotations

from fishmerge.errors import FishmergeError
from fishmerge.fisher.job import DEFAULT_STORE_ROOT
from fishmerge.flows.estimate_fisher import estimate_fisher
from fishmerge.tasks.merge import merge_execute, merge_fisher_existing, merge_plan, merge_report
from prefect import flow, get_run_logger
from prefect.states import Failed


def fishers_for(config: str, shards: int | None = None) -> tuple[dict[str, str], str | None]:
    """Fisher stores of the models that give `data:` instead of `fisher:` (reused, else estimated), and an error."""
    from fishmerge.merge.config import fisher_specs, load_merge_config

    cfg = load_merge_config(config)
    root = cfg.fisher.store_root or DEFAULT_STORE_ROOT
    out: dict[str, str] = {}
    for name, spec in fisher_specs(cfg).items():
        found = merge_fisher_existing(spec, root)
        if found:
            out[name] = found
            continue
        state = estimate_fisher(spec=spec, store_root=root, shards=shards or cfg.fisher.shards, return_state=True)
        if not state.is_completed():
            return out, f"Fisher of '{name}': {state.message}"
        out[name] = state.result()
    return out, None


@flow(name="merge-models")
def merge_models(
    config: str,
    overwrite: bool = False,
    shard_size: str | None = None,
    dask_address: str | None = None,
    threads: int | None = None,
    weights: dict[str, float] | None = None,
    progress: bool = False,
) -> dict | Failed:
    """Merge the models of a merge config; returns the output folders and timings."""
    log = get_run_logger()
    fishers, error = fishers_for(config)
    if error:
        return Failed(message=error)
    options = {
        "overwrite": overwrite,
        "shard_size": shard_size,
        "dask_address": dask_address,
        "threads": threads,
        "weights": weights,
        "progress": progress,
    }
    planned = merge_plan(config, fishers, options)
    if "error" in planned:
        return Failed(message=planned["error"])
    log.info("plan %s\n%s", planned["plan_id"], planned["plan"])
    summary = merge_execute(config, fishers, options)
    if "error" in summary:
        return Failed(message=summary["error"])
    merge_report(planned["plan"], summary, fishers)
    return {**summary, "fishers": fishers}


def run_merge(config: str, **options) -> dict:
    """Run the flow in this process; a failure becomes one FishmergeError with its message."""
    state = merge_models(config=config, return_state=True, **options)
    if not state.is_completed():
        raise FishmergeError(state.message or f"the merge-models flow ended {state.type.value}")
    return state.result()
