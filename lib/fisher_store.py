"""Fisher store format v1: a Zarr v3 group, one float32 array per checkpoint tensor key.

Public contract (sharded estimation and merging build on it):
- array path = the tensor's key in the model's safetensors checkpoint, same shape, float32,
  holding F already divided by N; uncompressed (Fishers barely compress and zstd reads slower);
- group attributes at least `format`, `format_version`, `estimator`, `n_examples`,
  `model_fingerprint`, `data_fingerprint`, `created`, `fishmerge_version`.
Written aside and renamed into place, so a reader never sees a half-written store.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr

from lib import __version__, storage
from lib.errors import FishmergeError

FORMAT = "fishmerge.fisher"
FORMAT_VERSION = 1
REQUIRED_ATTRS = (
    "format",
    "format_version",
    "estimator",
    "n_examples",
    "model_fingerprint",
    "data_fingerprint",
    "created",
    "fishmerge_version",
)
CHUNK_ELEMS = 4 * 2**20  # 16 MiB of float32 per chunk


def chunk_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of whole trailing rows, about CHUNK_ELEMS elements each."""
    if not shape:
        return ()
    row = math.prod(shape[1:]) or 1
    return (max(1, min(shape[0], CHUNK_ELEMS // row)), *shape[1:])


def create_fisher_array(group: zarr.Group, key: str, shape: tuple[int, ...]) -> zarr.Array:
    """A v1 Fisher array: float32, row chunks, uncompressed."""
    return group.create_array(name=key, shape=shape, dtype="float32", chunks=chunk_shape(shape), compressors=None)


def begin_store(uri: str) -> tuple[str, zarr.Group]:
    """An empty group to fill; local stores are staged in a hidden sibling and renamed on commit."""
    uri = storage.normalize(uri)
    if storage.is_remote(uri):
        storage.remove(uri)  # object stores have no rename: write in place, attributes last
        staging = uri
    else:
        dest = Path(uri)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FishmergeError(f"cannot create the store's folder '{dest.parent}': {exc}") from exc
        staging = str(dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    return staging, zarr.open_group(store=storage.zarr_store(staging), mode="w", zarr_format=3)


def commit_store(staging: str, uri: str, group: zarr.Group, attrs: Mapping[str, object]) -> str:
    """Write the attributes (last: a store without them is not a Fisher store) and move into place."""
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fishmerge_version": __version__,
        **attrs,
    }
    missing = [k for k in REQUIRED_ATTRS if k not in full]
    if missing:
        raise FishmergeError(f"Fisher store attributes {missing} are required by format v1")
    group.attrs.update(full)
    uri = storage.normalize(uri)
    if not storage.is_remote(uri):
        replace_dir(Path(staging), Path(uri))
    return uri


def abort_store(staging: str) -> None:
    """Remove what a failed write left (the staging folder, or the partial remote store)."""
    storage.remove(staging)


def write_fisher_store(uri: str, tensors: Mapping[str, np.ndarray], attrs: Mapping[str, object]) -> str:
    """Write a v1 store atomically (aside, then rename) from in-memory arrays; return its URI."""
    staging, group = begin_store(uri)
    try:
        for key, value in tensors.items():
            arr = np.asarray(value, dtype=np.float32)
            if not np.isfinite(arr).all():
                raise FishmergeError(f"the Fisher of '{key}' holds NaN/Inf: refusing to store it")
            create_fisher_array(group, key, arr.shape)[...] = arr
        return commit_store(staging, uri, group, attrs)
    except BaseException:
        abort_store(staging)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Rename src over dest; an existing dest is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
    os.rename(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def open_fisher_store(uri: str) -> zarr.Group:
    """Open a store read-only, checking it is a fishmerge Fisher of a version this code reads."""
    uri = storage.normalize(uri)
    if not storage.exists(uri):
        raise FishmergeError(f"no Fisher store at '{uri}'")
    try:
        group = zarr.open_group(store=storage.zarr_store(uri, read_only=True), mode="r")
    except Exception as exc:  # zarr raises several types for a non-store folder
        raise FishmergeError(f"'{uri}' is not a Zarr group: {exc}") from exc
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise FishmergeError(f"'{uri}' is not a fishmerge Fisher store (format={attrs.get('format')!r})")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise FishmergeError(
            f"'{uri}' has Fisher store format_version {attrs.get('format_version')}; this fishmerge reads "
            f"version {FORMAT_VERSION}: recompute the Fisher or upgrade fishmerge"
        )
    return group


def read_fisher(uri: str) -> dict[str, np.ndarray]:
    """All arrays of a store as numpy (for tests and small models)."""
    group = open_fisher_store(uri)
    return {name: arr[...] for name, arr in group.arrays()}
