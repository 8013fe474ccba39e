"""Reduce shard partials into a v1 Fisher store with Dask: blockwise sums, bounded memory."""

from __future__ import annotations

import functools
import logging

import dask
import dask.array as da
import numpy as np

from lib.fisher_shards import Shard, open_partial
from lib.fisher_store import abort_store, begin_store, commit_store, create_fisher_array

log = logging.getLogger(__name__)


class CorruptPartials(Exception):
    """Some shard partials failed their checksums or hold missing chunks; their indices are given."""

    def __init__(self, shards: list[int]):
        super().__init__(f"corrupt partials for shard(s) {shards}")
        self.shards = shards


def _validate(group) -> bool:
    """Read every chunk of one partial: CRC32C errors or NaN (a missing chunk) mean corrupt."""
    try:
        for _, arr in group.arrays():
            if not np.isfinite(arr[...]).all():
                return False
        return True
    except Exception:  # zarr/numcodecs raise various errors on a bad checksum or a truncated chunk
        return False


def reduce_partials(
    partials: str, plan: list[Shard], markers: dict[int, dict], store_uri: str, attrs: dict, num_workers: int = 2
) -> str:
    """F = Σ_shards Σₙ gₙ² / N into `store_uri`; raises CorruptPartials naming shards to recompute."""
    groups = {s.index: open_partial(partials, s, markers[s.index]) for s in plan}
    n_total = sum(int(markers[s.index]["n_examples"]) for s in plan)
    first = groups[plan[0].index]
    keys = sorted(name for name, _ in first.arrays())
    staging, out = begin_store(store_uri)
    try:
        stores, checks = [], []
        for key in keys:
            srcs = [da.from_zarr(groups[s.index][key]) for s in plan]
            total = functools.reduce(lambda a, b: a + b, srcs) / np.float32(n_total)
            dst = create_fisher_array(out, key, tuple(first[key].shape))
            stores.append(da.store(total.astype(np.float32), dst, lock=False, compute=False))
            checks.append(da.stack([da.isfinite(x).all() for x in srcs]))
        try:
            _, finite = dask.compute(stores, checks, scheduler="threads", num_workers=num_workers)
        except Exception as exc:  # a checksum failure surfaces here; find which shards
            log.warning("reduce failed (%s); validating partials one by one", exc)
            bad = [s.index for s in plan if not _validate(groups[s.index])]
            if bad:
                raise CorruptPartials(bad) from exc
            raise
        bad = sorted({s.index for per_key in finite for s, ok in zip(plan, per_key) if not ok})
        if bad:
            raise CorruptPartials(bad)
        return commit_store(staging, store_uri, out, {**attrs, "n_examples": n_total})
    except BaseException:
        abort_store(staging)
        raise
