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
from fishmerge.fisher.store import FisherReader
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
from fishmerge.merge.output import write_metadata
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


def row_blocks(rows: int, row_elems: int, block_elems: int, align: int = 1) -> list[tuple[int, int]]:
    """Row ranges of at most block_elems elements, aligned to `align` rows (Fisher chunk rows) when possible."""
    per = max(1, block_elems // max(row_elems, 1))
    if align > 1:
        per = (per // align) * align if per >= align else max(1, align // -(-align // per))
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


_fisher_readers: dict[str, FisherReader] = {}
_fisher_lock = threading.Lock()


def _fisher_reader(uri: str) -> FisherReader:
    """Fisher stores opened once per process (Dask workers included)."""
    with _fisher_lock:
        if uri not in _fisher_readers:
            _fisher_readers[uri] = FisherReader(uri)
        return _fisher_readers[uri]


def _fisher_rows(plan: MergePlan, m_index: int, key: str, r0: int, r1: int) -> np.ndarray:
    m = plan.models[m_index]
    values = _fisher_reader(m.fisher).rows(key, r0, r1)
    if not np.isfinite(values).all():
        raise FishmergeError(
            f"the Fisher store '{m.fisher}' of model '{m.name}' holds NaN/Inf in '{key}': recompute the Fisher "
            "(NaN Fishers usually mean NaN logits: check the model and data). Nothing was written at the output."
        )
    return values.reshape((r1 - r0, *m.refs[key].shape[1:]) if m.refs[key].shape else ())


def check_finite(values: np.ndarray, problem: str, fix: str) -> None:
    """Every number that reaches an output tensor is finite: stop the merge (nothing at the output) otherwise."""
    if not np.isfinite(values).all():
        raise FishmergeError(f"{problem}: {fix}. Nothing was written at the output.")


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


def check_input_finite(values: np.ndarray, who: str, key: str) -> np.ndarray:
    """Input tensor values as read, refused (naming the model and tensor) when any is NaN/Inf."""
    check_finite(values, f"{who} has NaN/Inf in '{key}'", "fix or re-save that checkpoint")
    return values


def read_input_rows(ref, r0: int, r1: int, who: str, key: str) -> np.ndarray:
    """Rows [r0, r1) of an input tensor as float32 (0-d tensors as a scalar array), checked finite."""
    values = check_input_finite(read_rows(ref, r0, r1), who, key)
    return values if ref.shape else values.reshape(())


def merge_block(plan: MergePlan, context: dict, staging: str, key: str, r0: int, r1: int) -> int:
    """Merge rows [r0, r1) of `key` for every target and write them in place; returns bytes written."""
    layout = context["layout"]
    thetas = [read_input_rows(m.refs[key], r0, r1, f"input model '{m.name}'", key) for m in plan.models]
    method = plan.merge_method
    kwargs: dict = {"options": plan.options}
    if method.needs_fisher:
        kwargs["fishers"] = [_fisher_rows(plan, i, key, r0, r1) for i in range(len(plan.models))]
    if method.needs_base:
        kwargs["base"] = read_input_rows(plan.base.refs[plan.base_keys[key]], r0, r1, "the base model", key)
    if plan.method == "ties":
        kwargs["context"] = {"ties_thresholds": context["ties_thresholds"][key]}
    written = 0
    shared_result = None
    for t in plan.targets:
        if method.needs_fisher or shared_result is None:  # only the fisher formula depends on the target
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


# ---------------------------------------------------------------- pre-passes (normalize, ties)


def _fisher_sq_sum(plan: MergePlan, m_index: int, key: str, r0: int, r1: int) -> float:
    f = _fisher_rows(plan, m_index, key, r0, r1).astype(np.float64)
    return float((f * f).sum())


def _ties_hist(plan: MergePlan, m_index: int, key: str, r0: int, r1: int, bucket: int | None) -> np.ndarray:
    """Histogram of |θᵢ − base| float32 bit patterns: high 16 bits, or low 16 bits within one high bucket."""
    m = plan.models[m_index]
    theta = read_input_rows(m.refs[key], r0, r1, f"input model '{m.name}'", key)
    tv = theta - read_input_rows(plan.base.refs[plan.base_keys[key]], r0, r1, "the base model", key)
    bits = np.abs(tv).ravel().view(np.uint32)
    if bucket is None:
        return np.bincount(bits >> 16, minlength=65536)
    return np.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=65536)


def _kth_largest_bucket(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(bucket holding the k-th largest value, how many values lie above that bucket)."""
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, k))
    bucket = 65535 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return bucket, above


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


def precompute(plan: MergePlan, address: str | None, progress: bool) -> dict:
    """Per-merge context computed from the whole inputs: global Fisher norms, TIES thresholds."""
    import dask

    ctx: dict = {}
    staging = Path(plan.staging)
    cache = staging / "context.json"
    if cache.exists():
        return json.loads(cache.read_text())
    plan_d = dask.delayed(plan, pure=True, traverse=False)  # one graph node, not walked per task
    fisher_ = plan.merge_method.needs_fisher
    align = {k: _fisher_chunk_rows(plan, k) for k in plan.shared} if fisher_ else {}
    if plan.method == "fisher" and plan.options.normalize:
        tasks, owners = [], []
        for i in range(len(plan.models)):
            for key in plan.shared:
                ref = plan.models[i].refs[key]
                for r0, r1 in row_blocks(ref.rows, ref.row_elems, plan.block_elems, align.get(key, 1)):
                    tasks.append(dask.delayed(_fisher_sq_sum)(plan_d, i, key, r0, r1))
                    owners.append(i)
        sums = run_tasks(tasks, address, plan.threads, "fisher norms", progress)
        totals = np.zeros(len(plan.models))
        for i, s in zip(owners, sums):
            totals[i] += s
        if (totals <= 0).any():
            raise FishmergeError("normalize: a Fisher is zero on every merged tensor; set `normalize: false`")
        ctx["fisher_norms"] = [float(np.sqrt(t)) for t in totals]
    if plan.method == "ties":
        ctx["ties_thresholds"] = ties_thresholds_streaming(plan, address, progress)
    cache.write_text(json.dumps(ctx))
    return ctx


def ties_thresholds_streaming(plan: MergePlan, address: str | None, progress: bool) -> dict[str, list[float]]:
    """Exact per-(tensor, model) k-th largest |θᵢ − base| (k = ceil(density·n)), in two streaming passes
    of 65536-bin histograms over float32 bit patterns (monotone for non-negative floats)."""
    import math

    import dask

    def blocks(key):
        ref = plan.models[0].refs[key]
        return row_blocks(ref.rows, ref.row_elems, plan.block_elems)

    pairs = [(key, i) for key in plan.shared for i in range(len(plan.models))]
    plan_d = dask.delayed(plan, pure=True, traverse=False)

    def hist_pass(buckets):
        tasks = []
        for key, i in pairs:
            b = None if buckets is None else buckets[(key, i)][0]
            tasks.append([dask.delayed(_ties_hist)(plan_d, i, key, r0, r1, b) for r0, r1 in blocks(key)])
        flat = [t for group in tasks for t in group]
        results = iter(run_tasks(flat, address, plan.threads, "ties thresholds", progress))
        return {p: sum(next(results) for _ in group) for p, group in zip(pairs, tasks)}

    first = hist_pass(None)
    buckets = {}
    for (key, i), hist in first.items():
        n = math.prod(plan.models[0].refs[key].shape) or 1
        k = max(1, math.ceil(plan.options.density * n))
        buckets[(key, i)] = (*_kth_largest_bucket(hist, k), k)
    second = hist_pass(buckets)
    out: dict[str, list[float]] = {key: [0.0] * len(plan.models) for key in plan.shared}
    for (key, i), hist in second.items():
        bucket, above, k = buckets[(key, i)]
        low, _ = _kth_largest_bucket(hist, k - above)
        out[key][i] = float(np.array([(bucket << 16) | low], dtype=np.uint32).view(np.float32)[0])
    return out


def _fisher_chunk_rows(plan: MergePlan, key: str) -> int:
    arr = _fisher_reader(plan.models[0].fisher).group[key]
    return int(arr.chunks[0]) if arr.ndim else 1


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
        ctx = precompute(plan, address, progress)
        pre_s = time.perf_counter() - started
        plan.options.fisher_norms = ctx.get("fisher_norms")
        layout = output_layout(plan)
        context = {**ctx, "layout": layout, "journal": journal}
        plan_d = dask.delayed(plan, pure=True, traverse=False)
        ctx_d = dask.delayed(context, pure=True, traverse=False)
        tasks, skipped = [], 0
        for key in plan.shared:
            ref = plan.models[0].refs[key]
            align = _fisher_chunk_rows(plan, key) if plan.merge_method.needs_fisher else 1
            for r0, r1 in row_blocks(ref.rows, ref.row_elems, plan.block_elems, align):
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
        "context": {k: v for k, v in ctx.items() if k == "fisher_norms"},
        "reused": False,
    }
