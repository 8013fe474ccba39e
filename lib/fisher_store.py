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

from lib import __version__
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


def local_path(uri: str) -> Path:
    """The filesystem path of a local store URI (plain path or file://)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" in uri:
        raise FishmergeError(f"store URI '{uri}': only local paths are supported by this version")
    return Path(uri)


def chunk_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of whole trailing rows, about CHUNK_ELEMS elements each."""
    if not shape:
        return ()
    row = math.prod(shape[1:]) or 1
    return (max(1, min(shape[0], CHUNK_ELEMS // row)), *shape[1:])


def write_fisher_store(uri: str, tensors: Mapping[str, np.ndarray], attrs: Mapping[str, object]) -> str:
    """Write a v1 store atomically (aside, then rename) and return its URI."""
    dest = local_path(uri).absolute()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FishmergeError(f"cannot create the store's folder '{dest.parent}': {exc}") from exc
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
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
    try:
        group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
        for key, value in tensors.items():
            arr = np.asarray(value, dtype=np.float32)
            if not np.isfinite(arr).all():
                raise FishmergeError(f"the Fisher of '{key}' holds NaN/Inf: refusing to store it")
            z = group.create_array(
                name=key, shape=arr.shape, dtype="float32", chunks=chunk_shape(arr.shape), compressors=None
            )
            z[...] = arr
        group.attrs.update(full)
        _replace_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def _replace_dir(src: Path, dest: Path) -> None:
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
    path = local_path(uri)
    if not path.exists():
        raise FishmergeError(f"no Fisher store at '{uri}'")
    try:
        group = zarr.open_group(store=str(path), mode="r")
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
