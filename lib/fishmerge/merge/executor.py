"""Execute a merge plan out of core: Dask block tasks from safetensors rows and Zarr Fishers to
pre-laid-out output files, resumable, renamed into place only when complete.

Each block task reads rows [r0, r1) of one merged tensor from every model (positioned reads),
the same rows of each Fisher (Zarr) or of the base, merges them in fp32 with the plan's method,
and writes the encoded rows straight to their final byte offsets in every target's output file;
then it appends the range to a journal. Memory is bounded by threads × block size (the plan
fits that to `memory_limit`). A killed run leaves the staging folder; the next run of the same
plan skips the journaled ranges. Nothing appears at the output path until every byte is there.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fishmerge.errors import FishmergeError
from fishmerge.fisher.statistics import FISHER
from fishmerge.io import safety
from fishmerge.io.safetensors import (
    FLOAT_DTYPES,
    OutputTensor,
    create_file,
    decode,
    encode,
    layout_file,
    read_raw,
    read_rows,
    write_rows,
)
from fishmerge.merge.inputs import (
    Grams,
    base_rows,
    check_finite,
    check_input_finite,
    fisher_rows,
    merge_blocks,
    model_rows,
    row_blocks,
)
from fishmerge.merge.output import recorded_context, write_metadata
from fishmerge.merge.plan import MergePlan, identical_output_exists, is_fishmerge_output, replaceable_output

JOURNAL = "journal.tsv"


# ---------------------------------------------------------------- layout and staging


def output_layout(plan: MergePlan) -> dict[str, dict[str, tuple[str, OutputTensor]]]:
    """target -> key -> (file relative to the output folder, tensor with its byte offset)."""
    layout: dict[str, dict[str, tuple[str, OutputTensor]]] = {}
    for t in plan.targets:
        refs = plan.models[t.index].refs
        layout[t.name] = {}
        for f in t.files:
            tensors = [OutputTensor(k, t.dtypes[k], refs[k].shape) for k in f.keys]
            layout_file(tensors)
            for ot in tensors:
                layout[t.name][ot.key] = (f"{t.name}/{f.name}", ot)
    return layout


def prepare_staging(plan: MergePlan) -> Path:
    """The staging folder of this plan, held by this process's lock (the caller holds it): reused
    when a run of the same plan was interrupted, else laid out afresh."""
    staging = Path(plan.staging)
    _remove_stale_stagings(plan)  # interrupted runs of other plans; live ones (and ours) hold their lock
    marker = staging / "plan.json"
    if marker.exists() and (staging / "out").is_dir():
        return staging
    for entry in staging.iterdir():
        if entry.name != safety.LOCK_NAME:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (staging / "out").mkdir(parents=True)
    for t in plan.targets:
        (staging / "out" / t.name).mkdir()
        refs = plan.models[t.index].refs
        for f in t.files:
            tensors = [OutputTensor(k, t.dtypes[k], refs[k].shape) for k in f.keys]
            header, size = layout_file(tensors)
            create_file(staging / "out" / t.name / f.name, header, size)
    (staging / "plan.json").write_text(json.dumps({"plan_id": plan.plan_id, "output": plan.output}))
    return staging


def remove_staging(staging: Path) -> None:
    """Remove this process's own staging folder (its lock file last: nobody takes it over half-removed)."""
    for entry in staging.iterdir() if staging.is_dir() else []:
        if entry.name != safety.LOCK_NAME:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


_journal_lock = threading.Lock()


class Journal:
    """Append-only record of finished (key, r0, r1) ranges; a torn last line is ignored."""

    def __init__(self, path: Path):
        self.path = path

    def done(self) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        if not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[3] == "ok":
                out.setdefault(parts[0], []).append((int(parts[1]), int(parts[2])))
        return out

    def add(self, key: str, r0: int, r1: int) -> None:
        with _journal_lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{key}\t{r0}\t{r1}\tok\n".encode())
            finally:
                os.close(fd)


def _covered(ranges: list[tuple[int, int]], r0: int, r1: int) -> bool:
    pos = r0
    for a, b in sorted(ranges):
        if a <= pos < b:
            pos = b
        if pos >= r1:
            return True
    return pos >= r1


# ---------------------------------------------------------------- blocks


def encode_finite(values: np.ndarray, dtype: str, key: str) -> bytes:
    """Encode finite float32 values as the output dtype; values that overflow it (float16 above
    65504, bfloat16 near the float32 limit) would be written as Inf, so they stop the merge."""
    data = encode(values, dtype)
    if dtype in ("F16", "BF16"):
        check_finite(
            decode(data, dtype, (-1,)),
            f"'{key}' holds values too large for {dtype} (they would be written as Inf)",
            "write the output as float32 (`dtype: float32`)",
        )
    return data


def merge_block(plan: MergePlan, context: dict, staging: str, key: str, r0: int, r1: int) -> int:
    """Merge rows [r0, r1) of `key` for every target and write them in place; returns bytes written."""
    layout = context["layout"]
    method = plan.merge_method
    thetas = [model_rows(plan, i, key, r0, r1) for i in range(len(plan.models))]
    kwargs: dict = {"params": plan.params, "context": context["prepasses"], "key": key}
    if key in plan.gram_layouts:
        kwargs["grams"], kwargs["layout"] = Grams(plan, key), plan.gram_layouts[key]
    elif FISHER in plan.statistics:
        kwargs["fishers"] = [fisher_rows(plan, i, key, r0, r1) for i in range(len(plan.models))]
    if method.needs_base:
        kwargs["base"] = base_rows(plan, key, r0, r1)
    written = 0
    shared_result = None
    once = plan.same_for_every_target(key)
    for t in plan.targets:
        if not once or shared_result is None:
            merged = method.merge(thetas, np.asarray(plan.weights), target=t.index, **kwargs)
            check_finite(merged, f"merging '{key}' gave NaN/Inf", "check the weights, `scale` and the inputs")
            shared_result = merged
        rel, ot = layout[t.name][key]
        data = encode_finite(shared_result, ot.dtype, key)
        write_rows(os.path.join(staging, "out", rel), ot, r0, data)
        written += len(data)
    context["journal"].add(key, r0, r1)
    return written


def copy_block(plan: MergePlan, context: dict, staging: str, target: str, key: str, r0: int, r1: int) -> int:
    """Copy rows of a target's own tensor (its head), converting the dtype when asked."""
    t = next(t for t in plan.targets if t.name == target)
    ref = plan.models[t.index].refs[key]
    rel, ot = context["layout"][target][key]
    who = f"input model '{target}'"
    if ot.dtype == ref.dtype:
        data = read_raw(ref, r0, r1)
        if ref.dtype in FLOAT_DTYPES:
            check_input_finite(decode(data, ref.dtype, (-1,)), who, key)
    else:
        data = encode_finite(check_input_finite(read_rows(ref, r0, r1), who, key), ot.dtype, key)
    write_rows(os.path.join(staging, "out", rel), ot, r0, data)
    context["journal"].add(f"{target}::{key}", r0, r1)
    return len(data)


# ---------------------------------------------------------------- running


class _Progress:
    """Counts finished tasks for a tqdm bar, from Dask's threaded scheduler callbacks."""

    def __init__(self, bar: tqdm):
        from dask.callbacks import Callback

        outer = self

        class CB(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                if isinstance(result, int | float):
                    outer.bar.update(1)

        self.bar, self.cb = bar, CB()


def run_tasks(tasks: list, address: str | None, threads: int, desc: str, progress: bool) -> list:
    """Compute Dask delayed tasks with a progress bar: threads here, or the cluster at `address`."""
    import dask

    bar = tqdm(total=len(tasks), desc=desc, unit="block", disable=not progress or not tasks, mininterval=0.5)
    try:
        if address:
            from distributed import Client, as_completed

            with Client(address, set_as_default=False) as client:
                futures = client.compute(tasks)
                for f in as_completed(futures, loop=client.loop):
                    f.result()
                    bar.update(1)
                return [f.result() for f in futures]
        p = _Progress(bar)
        with p.cb:
            return list(dask.compute(*tasks, scheduler="threads", num_workers=threads))
    finally:
        bar.close()


def run_prepasses(plan: MergePlan, address: str | None = None, progress: bool = False) -> dict:
    """The method's pre-passes over the whole inputs (e.g. global Fisher norms, TIES thresholds), each
    value under its name: the one step the executor and the λ search share."""

    def run(tasks: list, desc: str) -> list:
        return run_tasks(tasks, address, plan.threads, desc, progress)

    return {p.name: p.run(plan, run) for p in plan.merge_method.prepasses(plan.params)}


def cached_prepasses(plan: MergePlan, address: str | None, progress: bool) -> dict:
    """The pre-passes of this plan, computed once per staging folder (a resumed merge reuses them)."""
    cache = Path(plan.staging) / "context.json"
    if cache.exists():
        return json.loads(cache.read_text())
    ctx = run_prepasses(plan, address, progress)
    cache.write_text(json.dumps(ctx))
    return ctx


def execute(
    plan: MergePlan,
    *,
    address: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    on_block: Callable[[int], None] | None = None,
) -> dict:
    """Run the plan to completion (resuming an interrupted run of it); return a summary with timings.

    The staging folder is held by this process's lock for the whole run: a second run of the same
    plan waits for it (then finds the output done), and runs of other plans to the same output
    never take it for a leftover.
    """
    started = time.perf_counter()
    if identical_output_exists(plan):  # computed once, reused by every later run of the same merge
        _remove_stale_stagings(plan)  # e.g. left by a kill between the commit and the cleanup
        return _reused(plan, started)
    staging = Path(plan.staging)
    try:
        held = safety.Lock(staging, blocking=False)
    except BlockingIOError:
        print(f"merge: waiting for another fishmerge run of the same merge ({staging})", file=sys.stderr)
        held = safety.Lock(staging)
    with held:
        if identical_output_exists(plan):  # the run we waited for finished it
            remove_staging(staging)
            return _reused(plan, started)
        return _execute_held(plan, staging, address, progress, overwrite, started)


def _remove_stale_stagings(plan: MergePlan) -> None:
    """Staging folders of this output that no live run holds (interrupted runs of any plan)."""
    out = Path(plan.output)
    safety.remove_stale(out.parent, f".{out.name}.staging-*", markers=("plan.json",))


def _reused(plan: MergePlan, started: float) -> dict:
    return {
        "output": plan.output,
        "targets": {t.name: str(Path(plan.output) / t.name) for t in plan.targets},
        "blocks": 0,
        "blocks_resumed": 0,
        "bytes_written": 0,
        "precompute_s": 0.0,
        "merge_s": 0.0,
        "wall_s": round(time.perf_counter() - started, 3),
        "context": {},
        "reused": True,
    }


def _execute_held(plan: MergePlan, staging: Path, address: str | None, progress: bool, overwrite: bool, started: float):
    import dask

    prepare_staging(plan)
    journal = Journal(staging / JOURNAL)
    done = journal.done()
    try:
        ctx = cached_prepasses(plan, address, progress)
        pre_s = time.perf_counter() - started
        layout = output_layout(plan)
        context = {"prepasses": ctx, "layout": layout, "journal": journal}
        plan_d = dask.delayed(plan, pure=True, traverse=False)
        ctx_d = dask.delayed(context, pure=True, traverse=False)
        tasks, skipped = [], 0
        for key in plan.shared:
            for r0, r1 in merge_blocks(plan, key):
                if _covered(done.get(key, []), r0, r1):
                    skipped += 1
                    continue
                tasks.append(dask.delayed(merge_block, pure=False)(plan_d, ctx_d, str(staging), key, r0, r1))
        for t in plan.targets:
            for key in t.own_keys:
                ref = plan.models[t.index].refs[key]
                for r0, r1 in row_blocks(ref.rows, ref.row_elems, plan.block_elems):
                    if _covered(done.get(f"{t.name}::{key}", []), r0, r1):
                        skipped += 1
                        continue
                    tasks.append(dask.delayed(copy_block, pure=False)(plan_d, ctx_d, str(staging), t.name, key, r0, r1))
        written = run_tasks(tasks, address, plan.threads, f"merge {plan.config_name}", progress)
    except FishmergeError:
        remove_staging(staging)  # bad input: a rerun cannot fix it, leave nothing behind
        raise
    merge_s = time.perf_counter() - started - pre_s
    write_metadata(plan, staging / "out", ctx)
    for f in (staging / "out").rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    out = Path(plan.output)
    # Decided under the commit lock: another run's output that appeared meanwhile is replaced only with --overwrite.
    try:
        safety.replace_owned(
            staging / "out", out, replaceable_output if overwrite else safety.is_empty_dir, "a fishmerge output"
        )
    except FishmergeError:
        remove_staging(staging)
        if not overwrite and is_fishmerge_output(out):
            raise FishmergeError(
                f"the output '{out}' was written by another fishmerge run while this one merged: choose another "
                "`output:`, or pass --overwrite to replace it"
            ) from None
        raise
    remove_staging(staging)
    return {
        "output": str(out),
        "targets": {t.name: str(out / t.name) for t in plan.targets},
        "blocks": len(tasks),
        "blocks_resumed": skipped,
        "bytes_written": int(sum(written)),
        "precompute_s": round(pre_s, 3),
        "merge_s": round(merge_s, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "context": recorded_context(plan, ctx),
        "reused": False,
    }
