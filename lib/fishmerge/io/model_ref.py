"""Models named as users name them: a local folder, a Hugging Face hub id (`org/name`) found in the
local Hugging Face cache (never downloaded: these machines reach no hub), or an MLflow registry URI
(`models:/Name@alias`, `models:/Name/<version>`), downloaded once into a folder of fishmerge's own.
Every command resolves its model references here, so each accepts the same names."""

from __future__ import annotations

import re
from pathlib import Path

from fishmerge.errors import FishmergeError

REGISTRY_PREFIX = "models:/"
# Where registry versions are downloaded when the caller names no folder (the pipeline's run root).
DEFAULT_REGISTRY_ROOT = "./.fishmerge/runs/registry"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(ref: str) -> bool:
    """Whether `ref` has the shape of a hub id (`org/name`: one slash, no leading dot or slash)."""
    return bool(_HUB_ID.match(ref)) and ".." not in ref


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache this process reads (HF_HUB_CACHE / HF_HOME, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_hub_id(repo_id: str, beside: str = "the working folder") -> str:
    """The snapshot folder of `repo_id` (its `main` revision) in the local Hugging Face cache, offline;
    `beside` names where a folder of that name was looked for first (for the error)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, or a damaged cache entry: the same way out
        raise FishmergeError(
            f"model '{repo_id}' is not a folder in {beside}, and the hub id is not in the Hugging Face cache at "
            f"'{hub_cache_dir()}' ({type(exc).__name__}): put it there first (e.g. `hf download {repo_id}` on a "
            "machine with hub access, then copy the cache; HF_HUB_CACHE or HF_HOME point elsewhere), or give a "
            "local folder"
        ) from None


def resolve_model_ref(
    ref: str, registry_root: str | Path = DEFAULT_REGISTRY_ROOT, tracking_uri: str | None = None
) -> str:
    """A local model folder for `ref`: a folder as it is; `models:/…` downloaded from the MLflow registry at
    `tracking_uri` (env MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db) into `registry_root`; a hub
    id that is not a local folder from the HF cache."""
    if ref.startswith(REGISTRY_PREFIX):
        from fishmerge import registry
        from fishmerge.registry.registration import resolve_model_uri

        uri = registry.tracking_uri(tracking_uri)
        registry.check_reachable(uri)
        registry.point_mlflow_at(uri)
        return resolve_model_uri(ref, Path(registry_root).absolute())
    if not Path(ref).exists() and is_hub_id(ref):
        return resolve_hub_id(ref)
    return ref
