"""Reduce shard partials into a Fisher store (v1; v2 with Grams) with Dask: blockwise sums, bounded memory.

The work is planned as blocks of whole output chunks (small tensors packed together, about
BLOCK_BYTES of output per block) so that a model with hundreds of tensors is a few dozen Dask
tasks, not thousands. Each block reads its rows from every shard (checksummed chunks), checks
them, sums in fp32, divides the Fishers by N (Grams stay sums) and writes its output chunks:
memory ≈ 2 × BLOCK_BYTES per thread whatever the model size. Statistics this run did not compute
are copied block by block from the donor store of the same estimation (`donor`).
"""

from __future__ import annotations

import json

import dask
import numpy as np

from fishmerge.errors import FishmergeError
from fishmerge.fisher.shards import Shard, open_partial
from fishmerge.fisher.statistics import FISHER, GRAM
from fishmerge.fisher.store import (
    GRAM_GROUP,
    FisherReader,
    abort_store,
    begin_store,
    chunk_shape,
    commit_store,
    create_fisher_array,
    store_version,
    stored_grams,
)

BLOCK_BYTES = 32 * 2**20


class CorruptPartials(FishmergeError):
    """Some shard partials failed their checksums or hold missing chunks; their indices are given.
    The flow recomputes them; a retry of the same reduce cannot help (hence a FishmergeError)."""

    def __init__(self, shards: list[int]):
        super().__init__(f"corrupt partials for shard(s) {shards}")
        self.shards = shards

    def __reduce__(self):  # survives pickling (a Dask worker's reduce task raises it to the flow)
        return type(self), (self.shards,)


def is_corruption(exc: BaseException) -> bool:
    """Whether reading a partial failed because its data is damaged or gone: a chunk failing its
    checksum (zarr's Crc32c codec raises ValueError), missing or unreadable arrays, groups or files
    (KeyError, OSError, torn JSON metadata). Anything else is a bug or an environment problem, and
    must not be mistaken for a partial to recompute."""
    if isinstance(exc, (OSError, KeyError, json.JSONDecodeError)):
        return True
    return isinstance(exc, ValueError) and "checksum" in str(exc).lower()


def plan_blocks(shapes: dict[str, tuple[int, ...]]) -> list[list[tuple[str, int, int]]]:
    """Pack (tensor, row_start, row_stop) ranges of whole chunks into blocks of ~BLOCK_BYTES."""
    blocks, current, size = [], [], 0
    for key in sorted(shapes):
        shape = shapes[key]
        rows = shape[0] if shape else 1
        step = chunk_shape(shape)[0] if shape else 1
        row_bytes = 4 * (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            current.append((key, start, stop))
            size += (stop - start) * row_bytes
            if size >= BLOCK_BYTES:
                blocks.append(current)
                current, size = [], 0
    if current:
        blocks.append(current)
    return blocks


def _range_stats(key: str, out: np.ndarray, start: int) -> tuple:
    """(key, mass, max, zeros, count) of a Fisher range; (key, trace, max, 0, count) of a Gram's rows."""
    if _is_gram(key):
        rows = np.arange(out.shape[0])
        return (key, float(out[rows, rows + start].sum(dtype=np.float64)), float(np.abs(out).max(initial=0.0)), 0, 0)
    return (key, float(out.sum(dtype=np.float64)), float(out.max(initial=0.0)), int((out == 0).sum()), int(out.size))


def _is_gram(key: str) -> bool:
    return key.startswith(GRAM_GROUP + "/")


def _store_range(dst, key: str, start: int, stop: int, out: np.ndarray) -> tuple:
    """Write rows [start, stop) of `key` (the whole value of a 0-d array) and return their statistics."""
    if dst[key].ndim:
        dst[key][start:stop] = out
    else:
        dst[key][...] = out
    return _range_stats(key, out, start)


def _copy_block(block, donor: str, dst) -> tuple[list[int], list[tuple]]:
    """Copy one block of arrays from the donor store (statistics this run did not compute)."""
    reader = FisherReader(donor)
    stats = []
    for key, start, stop in block:
        out = reader.rows(key, start, stop)
        if not np.isfinite(out).all():
            raise FishmergeError(f"the store '{donor}' holds NaN/Inf in '{key}': delete it to recompute")
        stats.append(_store_range(dst, key, start, stop, out))
    return [], stats


def _reduce_block(block, sources: dict[int, object], dst, n_total: int) -> tuple[list[int], list[tuple]]:
    """Sum one block over shards into `dst`; return (shards whose data was unreadable or NaN,
    per-range statistics (key, mass, max, zeros, count) for the store's `tensor_stats`). Fishers are
    divided by N; Grams (`gram/…`) stay sums."""
    bad, stats = [], []
    for key, start, stop in block:
        acc = None
        for index, group in sources.items():
            try:
                arr = group[key]
                part = np.asarray(arr[start:stop] if arr.ndim else arr[...], dtype=np.float32)
            except Exception as exc:
                if not is_corruption(exc):
                    raise
                bad.append(index)  # checksum mismatch, truncated chunk, missing array
                continue
            if not np.isfinite(part).all():  # NaN fill: a chunk is missing
                bad.append(index)
                continue
            acc = part.copy() if acc is None else np.add(acc, part, out=acc)
        if bad:
            return sorted(set(bad)), []
        out = acc if _is_gram(key) else acc / np.float32(n_total)
        stats.append(_store_range(dst, key, start, stop, out))
    return [], stats


def reduce_partials(
    partials: str,
    plan: list[Shard],
    markers: dict[int, dict],
    store_uri: str,
    attrs: dict,
    num_workers: int = 2,
    donor: str | None = None,
    from_donor: tuple[str, ...] = (),
) -> str:
    """F = Σ_shards Σₙ gₙ² / N and G = Σ_shards Σ xxᵀ into `store_uri`, with the arrays of the statistics
    `from_donor` copied from the `donor` store; raises CorruptPartials naming shards to recompute (only for damaged
    or missing partial data: any other error propagates as it is)."""
    sources, bad, shapes, grams = {}, [], {}, {}
    for s in plan:
        try:
            sources[s.index] = group = open_partial(partials, s, markers[s.index])
            held = stored_grams(group)
            if s.index == plan[0].index:  # every partial holds the same arrays
                shapes = {name: tuple(arr.shape) for name, arr in group.arrays()}
                shapes.update({g["array"]: tuple(group[g["array"]].shape) for g in held.values()})
                grams = {k: {**g, "tokens": 0} for k, g in held.items()}
            if set(held) != set(grams):
                raise KeyError(f"shard {s.index} holds Grams of other weights")
            for k, g in held.items():
                grams[k]["tokens"] += int(g["tokens"])
        except Exception as exc:
            if not is_corruption(exc):
                raise
            bad.append(s.index)
    if bad:
        raise CorruptPartials(bad)
    copied: dict[str, tuple[int, ...]] = {}
    donor_version = store_version(donor) if donor else None
    if donor and from_donor:
        source = FisherReader(donor)
        if GRAM in from_donor:
            grams = stored_grams(source.group)
            copied.update({g["array"]: tuple(source.group[g["array"]].shape) for g in grams.values()})
        if FISHER in from_donor:
            copied.update({name: tuple(arr.shape) for name, arr in source.group.arrays()})
    n_total = sum(int(markers[s.index]["n_examples"]) for s in plan)
    staging, out = begin_store(store_uri)
    try:
        dst = {key: create_fisher_array(out, key, shape) for key, shape in {**shapes, **copied}.items()}
        tasks = [dask.delayed(_reduce_block)(b, sources, dst, n_total) for b in plan_blocks(shapes)]
        tasks += [dask.delayed(_copy_block)(b, donor, dst) for b in plan_blocks(copied)] if copied else []
        results = dask.compute(*tasks, scheduler="threads", num_workers=num_workers)
        bad = sorted({i for found, _ in results for i in found})
        if bad:
            raise CorruptPartials(bad)
        if copied and store_version(donor) != donor_version:  # moved aside or replaced while it was read
            raise FishmergeError(
                f"the store '{donor}' was replaced or removed while its arrays were copied: rerun (nothing was written)"
            )
        totals: dict[str, list] = {k: [0.0, 0.0, 0, 0] for k in {**shapes, **copied}}
        for _, stats in results:
            for key, mass, peak, zeros, count in stats:
                t = totals[key]
                t[0], t[1], t[2], t[3] = t[0] + mass, max(t[1], peak), t[2] + zeros, t[3] + count
        summary = {
            k: {"mass": t[0], "max": t[1], "zero_fraction": t[2] / max(t[3], 1)}
            for k, t in totals.items()
            if not _is_gram(k)
        }
        gram_stats = {k: {"trace": t[0], "max_abs": t[1]} for k, t in totals.items() if _is_gram(k)}
        extra = {"grams": grams, "gram_stats": gram_stats} if grams else {}
        return commit_store(staging, store_uri, out, {**attrs, "n_examples": n_total, "tensor_stats": summary, **extra})
    except BaseException:
        abort_store(staging)
        raise
