"""Prefect tasks for merging: thin wrappers over fishmerge.merge.plan / fishmerge.merge.executor (JSON in, JSON out).

Bad input (FishmergeError) comes back as {'error': message}: retrying cannot fix it, and the flow
turns it into one readable failure.
"""

from __future__ import annotations

from fishmerge.errors import FishmergeError
from prefect import task


def _plan(config: str, fishers: dict[str, str], options: dict):
    from fishmerge.merge.plan import plan_from_config

    return plan_from_config(
        config,
        fishers,
        weights=options.get("weights"),
        shard_size=options.get("shard_size"),
        threads=options.get("threads"),
        overwrite=options.get("overwrite", False),
    )


@task(name="merge-fisher-existing")
def merge_fisher_existing(spec: dict, store_root: str) -> str | None:
    """The finished Fisher store for this spec, if one was computed before (no model load)."""
    from fishmerge.fisher.job import FisherSpec, existing_store, resolve

    return existing_store(resolve(FisherSpec(**spec), None, store_root))


@task(name="merge-plan")
def merge_plan(config: str, fishers: dict[str, str], options: dict) -> dict:
    """Check every input and describe the merge: {'plan': text, 'plan_id': …} or {'error': …}."""
    from fishmerge.merge.plan import format_plan

    try:
        plan = _plan(config, fishers, options)
    except FishmergeError as exc:
        return {"error": str(exc)}
    return {"plan": format_plan(plan), "plan_id": plan.plan_id, "output": plan.output}


@task(name="merge-execute", retries=1, retry_delay_seconds=2)
def merge_execute(config: str, fishers: dict[str, str], options: dict) -> dict:
    """Run (or resume) the merge out of core; returns the execution summary."""
    from fishmerge.merge.executor import execute

    try:
        plan = _plan(config, fishers, options)
        summary = execute(
            plan,
            address=options.get("dask_address"),
            progress=options.get("progress", False),
            overwrite=options.get("overwrite", False),
        )
    except FishmergeError as exc:
        return {"error": str(exc)}
    return {
        **summary,
        "plan_id": plan.plan_id,
        "method": plan.method,
        "weights": dict(zip([m.name for m in plan.models], plan.weights)),
    }


@task(name="merge-report")
def merge_report(plan_text: str, summary: dict, fishers: dict[str, str]) -> str:
    """Markdown artifact: the plan, timings and output paths."""
    from prefect.artifacts import create_markdown_artifact

    rows = "\n".join(f"| {t} | `{p}` |" for t, p in summary["targets"].items())
    fisher_rows = "\n".join(f"| {n} | `{u}` |" for n, u in fishers.items()) or "| — | — |"
    md = f"""# Merge {summary["plan_id"]} ({summary["method"]})

## Outputs
| target | folder |
|---|---|
{rows}

## Timings
| step | seconds |
|---|---|
| pre-passes (norms, thresholds) | {summary["precompute_s"]} |
| merge | {summary["merge_s"]} |
| total | {summary["wall_s"]} |

Blocks run: {summary["blocks"]}; resumed from an interrupted run: {summary["blocks_resumed"]};
bytes written: {summary["bytes_written"]:,}.

## Fishers estimated or reused for this merge
| model | store |
|---|---|
{fisher_rows}

## Plan
```
{plan_text}
```
"""
    create_markdown_artifact(key=f"merge-{summary['plan_id']}", markdown=md, description="fishmerge merge")
    return md
