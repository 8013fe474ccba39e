"""Flow `estimate-fisher`: shards fanned out as Prefect tasks, partials in Zarr, a Dask reduce.

Reuses a finished store of the same Fisher id at once; resumes from complete shards after a
crash; recomputes corrupt partials. The flow bounds its own shard concurrency (`workers`, one
shard at a time by default) and caps torch threads, whether `fishmerge fisher` runs it or another
flow calls it as a subflow. Threads in this process by default, or a Dask cluster
(`dask_address`) through the Prefect Dask task runner.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
from fishmerge.errors import FishmergeError
from fishmerge.fisher.job import DEFAULT_STORE_ROOT
from fishmerge.fisher.reduce import CorruptPartials
from fishmerge.fisher.shards import plan_shards
from fishmerge.tasks import fails_on_bad_input
from fishmerge.tasks.fisher import fisher_missing_shards, fisher_reduce, fisher_report, fisher_resolve, fisher_shard
from prefect import flow, get_run_logger, unmapped
from prefect.exceptions import FailedRun
from prefect.task_runners import ThreadPoolTaskRunner

MAX_ROUNDS = 3


@contextlib.contextmanager
def torch_threads(workers: int) -> Iterator[None]:
    """Torch's intra-op threads capped to the CPUs over the shards computed at once (no
    oversubscription), restored afterwards (a pipeline goes on with the rest of its work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@flow(name="estimate-fisher")
@fails_on_bad_input
def estimate_fisher(
    spec: dict,
    store: str | None = None,
    store_root: str = DEFAULT_STORE_ROOT,
    shards: int = 1,
    workers: int | None = 1,
    keep_partials: bool = False,
    progress: bool = False,
) -> str:
    """Estimate (or reuse) the Fisher of `spec` (fishmerge.fisher.job.FisherSpec fields); return the store URI.

    `workers` shards are computed at once: with 1 (the default) one after another in the flow's own
    thread (torch keeps one warm thread pool: measured faster); with more, as tasks on the flow's task
    runner, at most `workers` at a time; None: all at once, as the task runner allows (a Dask cluster).
    Bad input ends the flow Failed with its one-line message.
    """
    workers = None if workers is None else max(1, int(workers))
    with torch_threads(workers or 1):
        return _estimate(spec, store, store_root, shards, workers, keep_partials, progress)


def _estimate(
    spec: dict,
    store: str | None,
    store_root: str,
    shards: int,
    workers: int | None,
    keep_partials: bool,
    progress: bool,
) -> str:
    log = get_run_logger()
    resolved = fisher_resolve(spec, store, store_root)
    if resolved["existing"]:
        log.info("reusing %s", resolved["existing"])
        return resolved["existing"]
    r = resolved["resolved"]
    plan = [(s.index, s.start, s.stop) for s in plan_shards(len(r["indices"]), shards)]
    started = time.perf_counter()
    summaries: dict[int, dict] = {}  # shard -> its summary, from the round that last computed it
    for _ in range(MAX_ROUNDS):
        todo = fisher_missing_shards(r, plan)
        if len(todo) < len(plan):
            log.info("resuming: %d of %d shards already complete", len(plan) - len(todo), len(plan))
        for s in _compute(r, todo, workers, progress):
            summaries[s["shard"]] = s
        done = list(summaries.values())
        try:
            uri = fisher_reduce(r, plan, done, time.perf_counter() - started, keep_partials)
        except CorruptPartials as exc:
            log.warning("corrupt partials for shards %s: recomputing them", exc.shards)
            continue
        fisher_report(uri, done)
        return uri
    raise FishmergeError(f"partials of {r['fisher_id']} kept failing their checksums: check the storage")


def _compute(r: dict, todo: list, workers: int | None, progress: bool) -> list[dict]:
    """Compute the shards `todo`, at most `workers` at a time (None: as the task runner allows)."""
    if workers == 1:
        return [fisher_shard(r, s, progress) for s in todo]
    out, wave = [], workers or max(1, len(todo))
    for i in range(0, len(todo), wave):  # waves: bounded whatever the task runner allows
        futures = fisher_shard.map(unmapped(r), todo[i : i + wave], unmapped(progress))
        futures.wait()  # the whole wave ends (a failed shard leaves no other one running) …
        out += [f.result() for f in futures]  # … then the first failure is raised
    return out


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
    """Run the flow with `workers` threads in this process, or on the Dask cluster at `dask_address`."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        runner, workers = DaskTaskRunner(address=dask_address), None  # the cluster bounds what runs at once
    else:
        workers = max(1, workers)
        runner = ThreadPoolTaskRunner(max_workers=workers)
    state = estimate_fisher.with_options(task_runner=runner)(
        spec=spec,
        store=store,
        store_root=store_root,
        shards=shards,
        workers=workers,
        keep_partials=keep_partials,
        progress=progress and workers == 1,
        return_state=True,
    )
    if not state.is_completed():
        try:
            state.result()  # a bug raises itself (the CLI's internal error) …
        except FailedRun:
            pass  # … bad input ended the flow as a Failed state with its one-line message
        raise FishmergeError(state.message or f"the estimate-fisher flow ended {state.type.value}")
    return state.result()
