"""Flow `merge-models`: estimate missing Fishers (the estimate-fisher subflow, cached ones reused),
plan once, merge out of core with Dask, report. Threads in the task by default, or a Dask cluster.

Entered with a config file (`merge_models`: deployments, `fishmerge merge`), read and validated
there once, or with a config already validated (`merge_validated`: the pipeline's subflow).
"""

from __future__ import annotations

from fishmerge.errors import FishmergeError
from fishmerge.fisher.job import DEFAULT_STORE_ROOT
from fishmerge.flows.estimate_fisher import estimate_fisher
from fishmerge.merge.config import MergeConfig, fisher_specs, load_merge_config, resolve_model_refs
from fishmerge.merge.plan import MergePlan, format_plan
from fishmerge.tasks import fails_on_bad_input
from fishmerge.tasks.merge import merge_execute, merge_fisher_existing, merge_plan, merge_report
from prefect import flow, get_run_logger


def fishers_for(cfg: MergeConfig, shards: int | None = None) -> dict[str, str]:
    """Fisher stores of the models that give `data:` instead of `fisher:` (reused, else estimated);
    a Fisher that cannot be estimated raises FishmergeError naming its model."""
    root = cfg.fisher.store_root or DEFAULT_STORE_ROOT
    out: dict[str, str] = {}
    for name, spec in fisher_specs(cfg).items():
        found = merge_fisher_existing(spec, root)
        if found:
            out[name] = found
            continue
        state = estimate_fisher(spec=spec, store_root=root, shards=shards or cfg.fisher.shards, return_state=True)
        if not state.is_completed():
            raise FishmergeError(f"Fisher of '{name}': {state.message}")
        out[name] = state.result()
    return out


def merge_steps(cfg: MergeConfig, fishers: dict[str, str], options: dict) -> tuple[dict, MergePlan]:
    """Plan (once), merge, report, in the calling flow: the summary and the plan."""
    plan = merge_plan(cfg, fishers, options)
    text = format_plan(plan)
    get_run_logger().info("plan %s\n%s", plan.plan_id, text)
    summary = merge_execute(plan, options)
    merge_report(text, summary, fishers)
    return {**summary, "fishers": fishers}, plan


@flow(name="merge-models")
@fails_on_bad_input
def merge_models(
    config: str,
    overwrite: bool = False,
    shard_size: str | None = None,
    dask_address: str | None = None,
    threads: int | None = None,
    weights: dict[str, float] | None = None,
    progress: bool = False,
) -> dict:
    """Merge the models of a merge config (a YAML path); returns the output folders and timings (bad
    input: a Failed state with its message)."""
    cfg = resolve_model_refs(load_merge_config(config))
    options = {
        "overwrite": overwrite,
        "shard_size": shard_size,
        "dask_address": dask_address,
        "threads": threads,
        "weights": weights,
        "progress": progress,
    }
    summary, _ = merge_steps(cfg, fishers_for(cfg), options)
    return summary


@flow(name="merge-models")
@fails_on_bad_input
def merge_validated(
    cfg: MergeConfig,
    fishers: dict[str, str],
    weights: dict[str, float] | None = None,
    overwrite: bool = False,
    dask_address: str | None = None,
    progress: bool = False,
) -> dict:
    """The same flow for a config validated before and its Fishers (the pipeline's merge step); the
    summary holds the plan under 'plan' (the evaluation and the MLflow run use the merge's own plan)."""
    options = {"overwrite": overwrite, "dask_address": dask_address, "weights": weights, "progress": progress}
    summary, plan = merge_steps(cfg, fishers, options)
    return {**summary, "plan": plan}


def run_merge(config: str, **options) -> dict:
    """Run the flow in this process; a failure becomes one FishmergeError with its message."""
    state = merge_models(config=config, return_state=True, **options)
    if not state.is_completed():
        raise FishmergeError(state.message or f"the merge-models flow ended {state.type.value}")
    return state.result()
