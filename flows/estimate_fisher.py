"""Flow `estimate-fisher`: shards fanned out as Prefect tasks, partials in Zarr, a Dask reduce.

Reuses a finished store of the same Fisher id at once; resumes from complete shards after a
crash; recomputes corrupt partials. Threads in this process by default, or a Dask cluster
(`dask_address`) through the Prefect Dask task runner.
"""

from __future__ import annotations

import os
import time

import torch
from fishmerge.errors import FishmergeError
from fishmerge.fisher.job import DEFAULT_STORE_ROOT
from fishmerge.fisher.shards import plan_shards
from fishmerge.tasks.fisher import fisher_missing_shards, fisher_reduce, fisher_report, fisher_resolve, fisher_shard
from prefect import flow, get_run_logger, unmapped
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

MAX_ROUNDS = 3


@flow(name="estimate-fisher")
def estimate_fisher(
    spec: dict,
    store: str | None = None,
    store_root: str = DEFAULT_STORE_ROOT,
    shards: int = 1,
    keep_partials: bool = False,
    progress: bool = False,
    sequential: bool = False,
) -> str | Failed:
    """Estimate (or reuse) the Fisher of `spec` (fishmerge.fisher.job.FisherSpec fields); return the store URI."""
    log = get_run_logger()
    resolved = fisher_resolve(spec, store, store_root)
    if "error" in resolved:
        return Failed(message=resolved["error"])
    if resolved["existing"]:
        log.info("reusing %s", resolved["existing"])
        return resolved["existing"]
    r = resolved["resolved"]
    plan = [(s.index, s.start, s.stop) for s in plan_shards(len(r["indices"]), shards)]
    started = time.perf_counter()
    summaries: list[dict] = []
    for _ in range(MAX_ROUNDS):
        todo = fisher_missing_shards(r, plan)
        if len(todo) < len(plan):
            log.info("resuming: %d of %d shards already complete", len(plan) - len(todo), len(plan))
        if sequential:  # in the flow's own thread: torch keeps one warm thread pool (measured faster)
            results = [fisher_shard(r, s, progress) for s in todo]
        else:
            results = [f.result() for f in fisher_shard.map(unmapped(r), todo, unmapped(progress))]
        errors = [x["error"] for x in results if "error" in x]
        if errors:
            return Failed(message=errors[0])
        summaries += results
        out = fisher_reduce(r, plan, summaries, time.perf_counter() - started, keep_partials)
        if "error" in out:
            return Failed(message=out["error"])
        if "store" in out:
            fisher_report(out["store"], summaries)
            return out["store"]
        log.warning("corrupt partials for shards %s: recomputing them", out["corrupt"])
    raise RuntimeError(f"partials of {r['fisher_id']} kept failing their checksums: check the storage")


def run_estimate_fisher(
    spec: dict,
    store: str | None = None,
    store_root: str = DEFAULT_STORE_ROOT,
    shards: int = 1,
    workers: int = 1,
    dask_address: str | None = None,
    keep_partials: bool = False,
    progress: bool = False,
) -> str:
    """Run the flow with threads in this process, or on the Dask cluster at `dask_address`."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=dask_address)
    else:
        workers = max(1, workers)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # no oversubscription
        runner = ThreadPoolTaskRunner(max_workers=workers)
    state = estimate_fisher.with_options(task_runner=runner)(
        spec=spec,
        store=store,
        store_root=store_root,
        shards=shards,
        keep_partials=keep_partials,
        progress=progress and workers == 1 and not dask_address,
        sequential=workers == 1 and not dask_address,
        return_state=True,
    )
    if not state.is_completed():
        raise FishmergeError(state.message or f"the estimate-fisher flow ended {state.type.value}")
    return state.result()
