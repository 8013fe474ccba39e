"""Shard partials: each shard owns its arrays, written aside, and a completion marker written last.

Layout under `<store>.partials/` (local folder or object-store prefix):
    shard-00003/attempt-<uuid>/   a Zarr group: Σₙ gₙ² per checkpoint key and/or the Grams Σ xxᵀ
                                  under gram/ with a `grams` attribute map as in a v2 store (float32,
                                  CRC32C per chunk, fill value NaN so a missing chunk reads as NaN, never 0)
    shard-00003/complete.json     {fisher_id, attempt, start, stop, n_examples, statistics} — written last
A shard is complete iff its marker names this Fisher id and its attempt group exists. Two runs
computing the same shard write different attempt folders and the marker is replaced atomically,
so concurrent runs never mix chunks. A partial that fails its checksums is recomputed, never summed.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from fishmerge.fisher.store import chunk_shape, gram_path
from fishmerge.io import storage

MARKER = "complete.json"


@dataclass(frozen=True)
class PartialGram:
    """One shard's Gram of one shared Linear input: the sum, its rows, and each reading weight's layout."""

    sum: np.ndarray
    tokens: int
    layouts: dict[str, str]  # checkpoint key of each weight reading it -> out_in | in_out


@dataclass(frozen=True)
class Shard:
    """A contiguous range [start, stop) of positions in the deterministic example selection."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def plan_shards(n_examples: int, k: int) -> list[Shard]:
    """K contiguous, balanced shards (fewer if there are fewer examples)."""
    k = max(1, min(int(k), n_examples))
    bounds = [round(i * n_examples / k) for i in range(k + 1)]
    return [Shard(i, bounds[i], bounds[i + 1]) for i in range(k)]


def partials_uri(store_uri: str) -> str:
    return storage.normalize(store_uri) + ".partials"


def _write_checked(group: zarr.Group, path: str, value: np.ndarray) -> None:
    parent, _, name = path.rpartition("/")
    if parent:
        group = group.require_group(parent)
    arr = np.asarray(value, dtype=np.float32)
    z = group.create_array(
        name=name,
        shape=arr.shape,
        dtype="float32",
        chunks=chunk_shape(arr.shape),
        compressors=[Crc32cCodec()],
        fill_value=float("nan"),
    )
    z[...] = arr


def write_partial(
    partials: str,
    shard: Shard,
    fisher_id: str,
    sums: Mapping[str, np.ndarray],
    n_examples: int,
    grams: Mapping[str, PartialGram] | None = None,
    statistics: list[str] | tuple[str, ...] = ("fisher",),
) -> str:
    """Write a shard's sums (Fisher sums by checkpoint key, Grams by their first weight's key) into a
    fresh attempt group, then its marker; return the attempt name."""
    attempt = f"attempt-{uuid.uuid4().hex[:12]}"
    uri = storage.join(partials, shard.name, attempt)
    group = zarr.open_group(store=storage.zarr_store(uri), mode="w", zarr_format=3)
    for key, value in sums.items():
        _write_checked(group, key, value)
    gram_map = {}
    for first, g in (grams or {}).items():
        _write_checked(group, gram_path(first), g.sum)
        for key, layout in g.layouts.items():
            gram_map[key] = {"array": gram_path(first), "tokens": int(g.tokens), "layout": layout}
    group.attrs.update({"fisher_id": fisher_id, "n_examples": n_examples, "grams": gram_map})
    marker = {
        "fisher_id": fisher_id,
        "attempt": attempt,
        "start": shard.start,
        "stop": shard.stop,
        "n_examples": n_examples,
        "statistics": list(statistics),
    }
    storage.write_json(storage.join(partials, shard.name, MARKER), marker)
    return attempt


def complete_shards(
    partials: str, fisher_id: str, plan: list[Shard], statistics: list[str] | tuple[str, ...] = ("fisher",)
) -> dict[int, dict]:
    """Shard index -> marker, for shards of this plan whose marker and attempt group exist and which
    hold the statistics this run computes (a partial computed beside another store's may lack some)."""
    done = {}
    for shard in plan:
        marker = storage.read_json(storage.join(partials, shard.name, MARKER))
        if not marker or marker.get("fisher_id") != fisher_id:
            continue
        if list(marker.get("statistics", ["fisher"])) != list(statistics):
            continue
        if (marker.get("start"), marker.get("stop")) != (shard.start, shard.stop):
            continue  # planned with another K: its range does not fit this plan
        if storage.exists(storage.join(partials, shard.name, marker["attempt"], "zarr.json")):
            done[shard.index] = marker
    return done


def open_partial(partials: str, shard: Shard, marker: dict) -> zarr.Group:
    uri = storage.join(partials, shard.name, marker["attempt"])
    return zarr.open_group(store=storage.zarr_store(uri, read_only=True), mode="r")


def discard_shard(partials: str, shard: Shard) -> None:
    """Forget a shard (corrupt partial): remove its marker and attempts so it is recomputed."""
    storage.remove(storage.join(partials, shard.name))
