"""Prefect tasks for merging: thin wrappers over fishmerge.merge.plan / fishmerge.merge.executor.

The validated config comes in, the plan is made once (merge-plan) and handed to merge-execute.
Bad input raises FishmergeError, never retried (fishmerge.tasks.not_bad_input).
"""

from __future__ import annotations

from fishmerge.merge.config import MergeConfig
from fishmerge.merge.plan import MergePlan
from fishmerge.tasks import not_bad_input
from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="merge-fisher-existing")
def merge_fisher_existing(spec: dict, store_root: str) -> str | None:
    """The finished Fisher store for this spec, if one was computed before (no model load)."""
    from fishmerge.fisher.job import FisherSpec, existing_store, resolve

    return existing_store(resolve(FisherSpec(**spec), None, store_root))


@task(name="merge-plan", cache_policy=NO_CACHE)
def merge_plan(cfg: MergeConfig, fishers: dict[str, str], options: dict) -> MergePlan:
    """Check every input and decide the merge (other λ: options['weights'])."""
    from fishmerge.merge.plan import plan_for

    return plan_for(
        cfg,
        fishers,
        weights=options.get("weights"),
        shard_size=options.get("shard_size"),
        threads=options.get("threads"),
        overwrite=options.get("overwrite", False),
    )


@task(name="merge-execute", retries=1, retry_delay_seconds=2, retry_condition_fn=not_bad_input, cache_policy=NO_CACHE)
def merge_execute(plan: MergePlan, options: dict) -> dict:
    """Run (or resume) the planned merge out of core; returns the execution summary."""
    from fishmerge.merge.executor import execute

    summary = execute(
        plan,
        address=options.get("dask_address"),
        progress=options.get("progress", False),
        overwrite=options.get("overwrite", False),
    )
    return {
        **summary,
        "plan_id": plan.plan_id,
        "method": plan.method,
        "weights": dict(zip([m.name for m in plan.models], plan.weights)),
    }


@task(name="merge-report")
def merge_report(plan_text: str, summary: dict, fishers: dict[str, str]) -> str:
    """Markdown artifact: the plan, timings and output paths."""
    from fishmerge.pipeline.report import merge_report_markdown
    from prefect.artifacts import create_markdown_artifact

    md = merge_report_markdown(plan_text, summary, fishers)
    create_markdown_artifact(key=f"merge-{summary['plan_id']}", markdown=md, description="fishmerge merge")
    return md
