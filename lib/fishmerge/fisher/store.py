"""Fisher store formats v1 and v2: a Zarr v3 group of merge statistics keyed to checkpoint tensors.

Public contract (sharded estimation and merging build on it):
- v1: one array per checkpoint tensor key, same shape, float32, holding the diagonal Fisher F
  already divided by N; uncompressed (Fishers barely compress and zstd reads slower);
  group attributes at least `format`, `format_version`, `estimator`, `n_examples`,
  `model_fingerprint`, `data_fingerprint`, `created`, `fishmerge_version`.
- v2 (written when a store holds Gram statistics): v1's attributes plus `statistics` (a list of
  `fisher`, `gram`) and `grams`, a map from a Linear weight's checkpoint key to
  {`array`: path of its Gram, `tokens`: rows summed, `layout`: `out_in` (nn.Linear) or `in_out`
  (HF Conv1D)}. The Fisher arrays sit where v1 puts them (present only when `statistics` lists
  `fisher`); each Gram G = Σ x xᵀ (in × in, float32, a sum: never divided) is an array under the
  subgroup `gram/`, named by the first weight key that reads it (q/k/v share one), row-chunked,
  uncompressed.
Written aside and renamed into place (object stores: copied into place, group metadata last), so a
reader never sees a half-written store.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr

from fishmerge import __version__
from fishmerge.errors import FishmergeError
from fishmerge.fisher.statistics import GRAM
from fishmerge.io import safety, storage

FORMAT = "fishmerge.fisher"
FORMAT_VERSION = 1  # a store of Fishers only
GRAM_FORMAT_VERSION = 2  # a store holding Grams (and Fishers, when asked for)
READ_VERSIONS = (FORMAT_VERSION, GRAM_FORMAT_VERSION)
GRAM_GROUP = "gram"
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
    """Chunks of whole trailing rows, at most about CHUNK_ELEMS elements each, split evenly so the
    last chunk is not mostly padding (Zarr stores every chunk at full size)."""
    if not shape:
        return ()
    row = math.prod(shape[1:]) or 1
    most = max(1, min(shape[0], CHUNK_ELEMS // row))
    n = -(-shape[0] // most)
    return (-(-shape[0] // n), *shape[1:])


def create_fisher_array(group: zarr.Group, key: str, shape: tuple[int, ...]) -> zarr.Array:
    """A store array (a Fisher, or a Gram at `gram/<key>`): float32, row chunks, uncompressed."""
    parent, _, name = key.rpartition("/")
    if parent:
        group = group.require_group(parent)
    return group.create_array(name=name, shape=shape, dtype="float32", chunks=chunk_shape(shape), compressors=None)


def gram_path(key: str) -> str:
    """Where the Gram first read by weight `key` sits in a store or a partial."""
    return f"{GRAM_GROUP}/{key}"


def held_statistics(attrs: Mapping[str, object]) -> tuple[str, ...]:
    """The statistics a store's attributes say it holds (a v1 store: the Fisher)."""
    held = attrs.get("statistics")
    return tuple(held) if isinstance(held, list) else ("fisher",)


WRITING = "writing"  # `format_state` of a store being written (staged, or being copied into place on S3)
_held: dict[str, safety.Lock] = {}  # staging folder -> this process's lock on it


def store_version(uri: str) -> object:
    """What changes when a local store is replaced (its group metadata is renamed into place with it):
    (inode, mtime) of its zarr.json; None for a remote or absent store."""
    uri = storage.normalize(uri)
    if storage.is_remote(uri):
        return None
    try:
        st = os.stat(os.path.join(uri, "zarr.json"))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def stored_attributes(uri: str) -> dict:
    """The group attributes in a store's `zarr.json` ({} when there is none or it is unreadable)."""
    meta = storage.read_json(storage.join(storage.normalize(uri), "zarr.json"))
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else {}


def is_fisher_store(uri: str) -> bool:
    """The path holds a group whose attributes say it is a fishmerge Fisher store (complete or being
    written by fishmerge): the only kind of store fishmerge ever replaces or removes."""
    return stored_attributes(uri).get("format") == FORMAT


def _replaceable(p: Path) -> bool:
    return is_fisher_store(str(p)) or safety.is_empty_dir(p)


def check_store_path(uri: str) -> None:
    """A store location must be free, or hold a fishmerge Fisher store: anything else is the user's."""
    uri = storage.normalize(uri)
    if storage.is_remote(uri):
        if storage.exists(uri) and storage.listdir(uri) and not is_fisher_store(uri):
            raise FishmergeError(
                f"'{uri}' already holds objects that are not a fishmerge Fisher store: fishmerge never "
                "overwrites them; choose another --store"
            )
        return
    p = Path(uri)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise FishmergeError(
            f"'{uri}' is a file, not a Fisher store: fishmerge never replaces it; choose another --store"
        )
    if p.is_dir() and any(p.iterdir()) and not is_fisher_store(uri):
        raise FishmergeError(
            f"'{uri}' is an existing folder that is not a Fisher store (no fishmerge format attributes): "
            "fishmerge never deletes it; choose another --store, or an empty or new folder"
        )


def begin_store(uri: str) -> tuple[str, zarr.Group]:
    """An empty group to fill; local stores are staged in a hidden sibling and renamed on commit."""
    uri = storage.normalize(uri)
    check_store_path(uri)
    if storage.is_remote(uri):
        # staged aside like local stores (never at the final URI, which another run may have finished)
        parent, name = uri.rsplit("/", 1)
        staging = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        attributes = {"format": FORMAT, "format_state": WRITING}  # ours from its first object on
        group = zarr.open_group(store=storage.zarr_store(staging), mode="w", zarr_format=3, attributes=attributes)
        return staging, group
    dest = Path(uri)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FishmergeError(f"cannot create the store's folder '{dest.parent}': {exc}") from exc
    safety.remove_stale(dest.parent, f".{dest.name}.tmp-*", markers=("zarr.json",))  # left by killed runs
    staging = str(dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    _held[staging] = safety.Lock(staging)
    try:
        return staging, zarr.open_group(store=storage.zarr_store(staging), mode="a", zarr_format=3)
    except BaseException:
        abort_store(staging)
        raise


def commit_store(staging: str, uri: str, group: zarr.Group, attrs: Mapping[str, object]) -> str:
    """Write the attributes (last: a store without them is not a Fisher store) and move into place."""
    version = GRAM_FORMAT_VERSION if GRAM in held_statistics(attrs) else FORMAT_VERSION
    full = {
        "format": FORMAT,
        "format_version": version,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fishmerge_version": __version__,
        **attrs,
    }
    missing = [k for k in REQUIRED_ATTRS if k not in full]
    if missing:
        raise FishmergeError(f"Fisher store attributes {missing} are required by format v1")
    if version == GRAM_FORMAT_VERSION and not isinstance(full.get("grams"), dict):
        raise FishmergeError("a store holding Grams needs the `grams` attribute (format v2)")
    uri = storage.normalize(uri)
    if storage.is_remote(uri):
        group.attrs.put(full)  # replaces the `writing` state: the staged store is complete
        _publish_remote(staging, uri, full)
        return uri
    group.attrs.update(full)
    lock = _held.pop(staging, None)
    try:
        # held through the rename (a kill before it leaves a staging folder provably stale), then dropped
        keep = lambda dest: holds_as_much(stored_attributes(str(dest)), full)  # noqa: E731
        if safety.replace_owned(Path(staging), Path(uri), _replaceable, "a Fisher store", keep=keep):
            (Path(uri) / safety.LOCK_NAME).unlink(missing_ok=True)
    finally:
        if lock:
            lock.release()
    return uri


def is_finished(attrs: Mapping[str, object]) -> bool:
    """A complete Fisher store's attributes (not one being written, torn, or of a version not read here)."""
    state = (attrs.get("format"), attrs.get("format_version"), attrs.get("format_state"))
    return state[0] == FORMAT and state[1] in READ_VERSIONS and state[2] != WRITING


def _estimation(attrs: Mapping[str, object]) -> object:
    return attrs.get("estimation_id") or attrs.get("fisher_id")


def holds_as_much(old: Mapping[str, object], new: Mapping[str, object]) -> bool:
    """Whether the finished store `old` is of the same estimation as the store `new` being committed and
    holds every statistic it would bring: `old` stays (a concurrent run completed it further)."""
    same = _estimation(old) is not None and _estimation(old) == _estimation(new)
    return is_finished(old) and same and set(held_statistics(new)) <= set(held_statistics(old))


def completes(new: Mapping[str, object], old: Mapping[str, object]) -> bool:
    """Whether store attributes `new` are those of the same estimation as the finished store `old`, holding
    every statistic it holds and more: the store `old` is being completed (its arrays were copied in)."""
    same = _estimation(new) is not None and _estimation(new) == _estimation(old)
    return same and set(held_statistics(old)) < set(held_statistics(new))


def _publish_remote(staging: str, uri: str, attrs: Mapping[str, object]) -> None:
    """Copy a complete staged remote store to its final URI (object stores have no rename).

    The final URI is only written when it is absent or holds an unfinished fishmerge store (being
    written, or left by a killed run): its group metadata is marked `writing` first, the arrays are
    copied over it, objects of the old unfinished store that the new one lacks are removed, and the
    complete group metadata is copied last, so a reader never takes a half-copied store for a
    finished one. A finished store another run wrote is never deleted nor overwritten: the same
    Fisher (same `fisher_id`) is kept as it is; one this store completes (same estimation, fewer
    statistics) is overwritten like an unfinished one; anything else is an error."""
    current = stored_attributes(uri)
    if holds_as_much(current, attrs):
        abort_store(staging)  # a concurrent run finished this store, or completed it further: it stands
        return
    if is_finished(current) and not completes(attrs, current):
        ours = attrs.get("fisher_id")
        if ours is None or current.get("fisher_id") != ours:
            raise FishmergeError(
                f"'{uri}' holds a finished Fisher store that another run wrote meanwhile (id "
                f"{current.get('fisher_id')}): fishmerge never replaces it; choose another --store, or delete it"
            )
        abort_store(staging)  # a concurrent run of the same Fisher finished first: its store stands
        return
    check_store_path(uri)  # absent, or a fishmerge store: nothing of the user's is written over
    fs, src = storage.filesystem(staging)
    _, dst = storage.filesystem(uri)
    meta = "zarr.json"
    if current.get("format_state") != WRITING:
        fs.pipe_file(f"{dst}/{meta}", json.dumps(_WRITING_GROUP).encode())  # unfinished from here on
    fs.invalidate_cache(src)
    fs.invalidate_cache(dst)
    staged = {p[len(src) + 1 :] for p in fs.find(src)}
    old = {p[len(dst) + 1 :] for p in fs.find(dst)} if fs.exists(dst) else set()
    for key in sorted(staged - {meta}):
        fs.copy(f"{src}/{key}", f"{dst}/{key}")
    for key in sorted(old - staged):
        fs.rm_file(f"{dst}/{key}")  # left by the unfinished store this one replaces
    fs.copy(f"{src}/{meta}", f"{dst}/{meta}")  # complete from here on
    abort_store(staging)


_WRITING_GROUP = {"zarr_format": 3, "node_type": "group", "attributes": {"format": FORMAT, "format_state": WRITING}}


def abort_store(staging: str) -> None:
    """Remove what a failed write left: the staging folder (local) or prefix (remote), never the store."""
    storage.remove(staging)
    lock = _held.pop(staging, None)
    if lock:
        lock.release()


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


def open_fisher_store(uri: str) -> zarr.Group:
    """Open a store read-only, checking it is a fishmerge Fisher of a version this code reads."""
    uri = storage.normalize(uri)
    if not storage.exists(uri):
        raise FishmergeError(f"no Fisher store at '{uri}'")
    if not storage.exists(storage.join(uri, "zarr.json")):
        raise FishmergeError(
            f"'{uri}' is not a fishmerge Fisher store (no zarr.json): point at a store `fishmerge fisher` wrote"
        )
    try:
        group = zarr.open_group(store=storage.zarr_store(uri, read_only=True), mode="r")
    except Exception as exc:  # zarr raises several types for a non-store folder
        raise FishmergeError(f"'{uri}' is not a Zarr group: {exc}") from exc
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise FishmergeError(f"'{uri}' is not a fishmerge Fisher store (format={attrs.get('format')!r})")
    if attrs.get("format_state") == WRITING:
        raise FishmergeError(
            f"the Fisher store '{uri}' is incomplete (its write was interrupted): rerun to recompute it"
        )
    if attrs.get("format_version") not in READ_VERSIONS:
        raise FishmergeError(
            f"'{uri}' has Fisher store format_version {attrs.get('format_version')}; this fishmerge reads "
            f"versions {', '.join(map(str, READ_VERSIONS))}: recompute the Fisher or upgrade fishmerge"
        )
    return group


def read_fisher(uri: str) -> dict[str, np.ndarray]:
    """All Fisher arrays of a store as numpy (for tests and small models)."""
    group = open_fisher_store(uri)
    return {name: arr[...] for name, arr in group.arrays()}


def read_grams(uri: str) -> dict[str, tuple[np.ndarray, int, str]]:
    """Weight key -> (its Gram Σ x xᵀ, tokens, layout) of a store (for tests and small models)."""
    group = open_fisher_store(uri)
    return {k: (group[g["array"]][...], int(g["tokens"]), g["layout"]) for k, g in stored_grams(group).items()}


def stored_grams(group: zarr.Group) -> dict[str, dict]:
    """A store's `grams` map (weight key -> {array, tokens, layout}); empty for a store without Grams."""
    grams = group.attrs.get("grams")
    return dict(grams) if isinstance(grams, dict) else {}


class FisherReader:
    """Row ranges of a store's arrays. Local v1 stores (uncompressed, little-endian float32, default
    chunk keys) are read with positioned reads of the chunk files, 10× faster than Zarr's own
    reader here; anything else goes through Zarr."""

    def __init__(self, uri: str):
        self.uri = storage.normalize(uri)
        self.group = open_fisher_store(self.uri)
        self._arrays: dict[str, tuple] = {}

    def _array(self, key: str) -> tuple:
        if key not in self._arrays:
            arr = self.group[key]
            meta = arr.metadata
            plain = (
                not storage.is_remote(self.uri)
                and len(arr.shape) >= 1
                and [type(c).__name__ for c in meta.codecs] == ["BytesCodec"]
                and str(getattr(meta.codecs[0], "endian", "little")).endswith("little")
                and str(meta.data_type).startswith("Float32")
                and getattr(meta.chunk_key_encoding, "separator", None) == "/"
                and type(meta.chunk_key_encoding).__name__ == "DefaultChunkKeyEncoding"
                and tuple(arr.chunks[1:]) == tuple(arr.shape[1:])
            )
            self._arrays[key] = (arr, plain)
        return self._arrays[key]

    def rows(self, key: str, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of `key` as float32 (the whole value for 0-d arrays)."""
        arr, plain = self._array(key)
        if not plain:
            return np.asarray(arr[r0:r1] if arr.ndim else arr[...], dtype=np.float32)
        shape = arr.shape
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        cr = arr.chunks[0]
        out = np.empty((r1 - r0) * row, dtype=np.float32)
        fill = float(arr.metadata.fill_value or 0.0)
        r = r0
        while r < r1:
            c = r // cr
            stop = min(r1, (c + 1) * cr)
            key_path = arr.metadata.chunk_key_encoding.encode_chunk_key((c, *([0] * (len(shape) - 1))))
            path = os.path.join(self.uri, key, key_path)
            dst = out[(r - r0) * row : (stop - r0) * row]
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                dst[:] = fill  # never written: Zarr's fill value
            else:
                try:
                    want = dst.nbytes
                    buf = os.pread(fd, want, (r - c * cr) * row * 4)
                    if len(buf) != want:
                        raise FishmergeError(
                            f"chunk '{path}' of Fisher store '{self.uri}' is truncated: recompute the Fisher"
                        )
                    dst[:] = np.frombuffer(buf, dtype="<f4")
                finally:
                    os.close(fd)
            r = stop
        return out.reshape((r1 - r0, *shape[1:]))
