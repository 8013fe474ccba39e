"""One code path for local folders and object storage (s3://…): fsspec for files, zarr stores on top.

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL
or FISHMERGE_S3_ENDPOINT_URL for S3-compatible servers), never from config files.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import zarr

from fishmerge.errors import FishmergeError
from fishmerge.io import safety


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for a URI; for S3, an endpoint from the environment (MinIO, moto, …)."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("FISHMERGE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def normalize(uri: str) -> str:
    """Absolute local paths (no file://), remote URIs unchanged, no trailing slash."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if not is_remote(uri):
        uri = os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI."""
    try:
        return fsspec.core.url_to_fs(uri, **storage_options(uri))
    except (ImportError, ValueError) as exc:
        raise FishmergeError(f"cannot open storage for '{uri}': {exc}") from exc


def zarr_store(uri: str, read_only: bool = False):
    """A zarr v3 store object for a local path or a remote URI."""
    uri = normalize(uri)
    if is_remote(uri):
        return zarr.storage.FsspecStore.from_url(uri, storage_options=storage_options(uri), read_only=read_only)
    return zarr.storage.LocalStore(uri, read_only=read_only)


@contextlib.contextmanager
def _remote_errors(uri: str) -> Iterator[None]:
    """Object-store failures (botocore's credential/endpoint errors, OSError…) as one readable error;
    local errors pass through unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_remote(uri):
            raise
        raise FishmergeError(
            f"cannot reach '{uri}' ({type(exc).__name__}: {exc}): check the path, or for s3:// the bucket, "
            "AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and endpoint in the environment"
        ) from exc


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with _remote_errors(uri):
        fs.invalidate_cache(path)  # object-store listings are cached; another process may have written
        return fs.exists(path)


def read_json(uri: str) -> dict | None:
    """The JSON object at `uri`, or None when there is none (or it is unreadable: a torn write)."""
    fs, path = filesystem(uri)
    with _remote_errors(uri):
        try:
            with fs.open(path, "r") as f:
                return json.load(f)
        except (FileNotFoundError, IsADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return None


def read_bytes(uri: str, max_bytes: int) -> bytes:
    """The whole file at `uri`, read by its size. A file over `max_bytes` or one that changed size while
    read raises ValueError (no unbounded read); an unreadable one raises FishmergeError (remote) or OSError."""
    fs, path = filesystem(uri)
    with _remote_errors(uri):
        size = fs.size(path)
    if size is None or size > max_bytes:
        raise ValueError(f"{uri}: {size} bytes, more than the {max_bytes} read here")
    with _remote_errors(uri):
        data = fs.cat_file(path, start=0, end=size + 1)  # one byte more than expected: growth shows
    if len(data) != size:
        raise ValueError(f"{uri}: read {len(data)} bytes where it had {size} (the file changed while read)")
    return data


def write_json(uri: str, obj: Any) -> None:
    """Write JSON so readers see the old or the new object, never half of one.

    Local: write a sibling and rename. S3: a PUT is atomic.
    """
    fs, path = filesystem(uri)
    data = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False)  # NaN is not JSON: never written
    if is_remote(uri):
        fs.pipe_file(path, data.encode())
        return
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove(uri: str) -> None:
    """Remove a file or folder tree if present."""
    fs, path = filesystem(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def listdir(uri: str) -> list[str]:
    """Names directly below a folder URI (empty when it does not exist)."""
    fs, path = filesystem(uri)
    with _remote_errors(uri):
        try:
            fs.invalidate_cache(path)
            return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []


def check_writable_root(uri: str) -> None:
    """Fail early, with the reason, when a store root cannot be created or written."""
    if not is_remote(uri):  # the nearest folder that exists must be writable; nothing is created here
        folder = safety.existing_ancestor(normalize(uri))
        if not folder.is_dir():
            raise FishmergeError(
                f"the store root '{uri}' is unreachable or not writable: '{folder}' is a file; choose another root"
            )
        try:
            return safety.probe_writable(folder)
        except OSError as exc:
            raise FishmergeError(
                f"the store root '{uri}' is unreachable or not writable ({type(exc).__name__}: {exc}). Check the "
                "path, or for s3:// the bucket, AWS credentials and endpoint in the environment."
            ) from exc
    fs, path = filesystem(uri)
    probe = join(uri, f".fishmerge-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs.pipe_file(filesystem(probe)[1], b"ok")
        fs.rm(filesystem(probe)[1])
    except Exception as exc:  # botocore, OSError, PermissionError…: all mean the same to the user
        raise FishmergeError(
            f"the store root '{uri}' is unreachable or not writable ({type(exc).__name__}: {exc}). Check the "
            "path, or for s3:// the bucket, AWS credentials and endpoint in the environment."
        ) from exc
