"""Reduce shard partials into a v1 Fisher store with Dask: blockwise sums, bounded memory.

The work is planned as blocks of whole output chunks (small tensors packed together, about
BLOCK_BYTES of output per block) so that a model with hundreds of tensors is a few dozen Dask
tasks, not thousands. Each block reads its rows from every shard (checksummed chunks), checks
them, sums in fp32, divides by N and writes its output chunks: memory ≈ 2 × BLOCK_BYTES per
thread whatever the model size.
"""

from __future__ import annotations

import json

import dask
import numpy as np

from fishmerge.errors import FishmergeError
from fishmerge.fisher.shards import Shard, open_partial
from fishmerge.fisher.store import abort_store, begin_store, chunk_shape, commit_store, create_fisher_array

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


def _reduce_block(block, sources: dict[int, object], dst, n_total: int) -> tuple[list[int], list[tuple]]:
    """Sum one block over shards into `dst`; return (shards whose data was unreadable or NaN,
    per-range statistics (key, mass, max, zeros, count) for the store's `tensor_stats`)."""
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
        out = acc / np.float32(n_total)
        if dst[key].ndim:
            dst[key][start:stop] = out
        else:
            dst[key][...] = out
        stats.append(
            (key, float(out.sum(dtype=np.float64)), float(out.max(initial=0.0)), int((out == 0).sum()), int(out.size))
        )
    return [], stats


def reduce_partials(
    partials: str, plan: list[Shard], markers: dict[int, dict], store_uri: str, attrs: dict, num_workers: int = 2
) -> str:
    """F = Σ_shards Σₙ gₙ² / N into `store_uri`; raises CorruptPartials naming shards to recompute
    (only for damaged or missing partial data: any other error propagates as it is)."""
    sources, bad, shapes = {}, [], {}
    for s in plan:
        try:
            sources[s.index] = open_partial(partials, s, markers[s.index])
            if s.index == plan[0].index:  # every partial holds the same arrays
                shapes = {name: tuple(arr.shape) for name, arr in sources[s.index].arrays()}
        except Exception as exc:
            if not is_corruption(exc):
                raise
            bad.append(s.index)
    if bad:
        raise CorruptPartials(bad)
    n_total = sum(int(markers[s.index]["n_examples"]) for s in plan)
    staging, out = begin_store(store_uri)
    try:
        dst = {key: create_fisher_array(out, key, shape) for key, shape in shapes.items()}
        tasks = [dask.delayed(_reduce_block)(b, sources, dst, n_total) for b in plan_blocks(shapes)]
        results = dask.compute(*tasks, scheduler="threads", num_workers=num_workers)
        bad = sorted({i for found, _ in results for i in found})
        if bad:
            raise CorruptPartials(bad)
        totals: dict[str, list] = {k: [0.0, 0.0, 0, 0] for k in shapes}
        for _, stats in results:
            for key, mass, peak, zeros, count in stats:
                t = totals[key]
                t[0], t[1], t[2], t[3] = t[0] + mass, max(t[1], peak), t[2] + zeros, t[3] + count
        summary = {k: {"mass": t[0], "max": t[1], "zero_fraction": t[2] / max(t[3], 1)} for k, t in totals.items()}
        return commit_store(staging, store_uri, out, {**attrs, "n_examples": n_total, "tensor_stats": summary})
    except BaseException:
        abort_store(staging)
        raise
