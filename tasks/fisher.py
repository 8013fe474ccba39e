"""Prefect tasks for Fisher estimation: thin wrappers over fishmerge.fisher.job (inputs/outputs are JSON).

Bad input raises `FishmergeError` (corrupt partials: `CorruptPartials`, one kind of it), never
retried (fishmerge.tasks.not_bad_input), logged as its one line; the flow turns it into one failure.
"""

from __future__ import annotations

from fishmerge.fisher import job
from fishmerge.fisher.shards import Shard
from fishmerge.tasks import not_bad_input
from prefect import task


@task(
    name="fisher-shard",
    tags=["fisher-gpu"],
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=not_bad_input,
    task_run_name="shard-{shard[0]}",
)
def fisher_shard(resolved: dict, shard: tuple[int, int, int], progress: bool = False) -> dict:
    """Compute one shard's partial (its own model copy, its own device) and return its summary."""
    return job.compute_shard(job.Resolved.from_dict(resolved), Shard(*shard), progress)


@task(name="fisher-missing-shards")
def fisher_missing_shards(resolved: dict, plan: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Shards of the plan without a complete partial (all of them on a first run)."""
    todo = job.missing_shards(job.Resolved.from_dict(resolved), [Shard(*s) for s in plan])
    return [(s.index, s.start, s.stop) for s in todo]


@task(name="fisher-reduce")
def fisher_reduce(
    resolved: dict, plan: list[tuple[int, int, int]], summaries: list[dict], wall_s: float, keep_partials: bool
) -> str:
    """Reduce partials into the store and return its URI; raises CorruptPartials naming shards to recompute."""
    r = job.Resolved.from_dict(resolved)
    return job.finish(r, [Shard(*s) for s in plan], summaries, wall_s, keep_partials)


@task(name="fisher-resolve")
def fisher_resolve(spec: dict, store: str | None, store_root: str) -> dict:
    """Fingerprint inputs (no model load) → {'resolved': resolved spec, 'existing': the finished store or None}."""
    r = job.resolve(job.FisherSpec(**spec), store, store_root)
    return {"resolved": r.to_dict(), "existing": job.existing_store(r)}


@task(name="fisher-report")
def fisher_report(store: str, summaries: list[dict]) -> str:
    """Markdown artifact (spec, examples, wall time, throughput, per-layer mass) and a PNG beside the store."""
    from fishmerge.fisher.report import fisher_report_markdown
    from fishmerge.fisher.store import stored_attributes
    from prefect.artifacts import create_markdown_artifact

    md, png = fisher_report_markdown(store, summaries)
    key = f"fisher-{stored_attributes(store)['fisher_id']}"
    create_markdown_artifact(key=key, markdown=md, description="fishmerge Fisher")
    return png
