"""Registering merged model folders as MLflow model versions (idempotent by lineage) and downloading them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fishmerge.errors import FishmergeError
from fishmerge.io import safety
from fishmerge.io.checkpoint import safetensors_files
from fishmerge.registry.connection import (
    CHALLENGER,
    CHAMPION,
    DECISION_TAG,
    LINEAGE_TAG,
    MODEL_ARTIFACT,
    quote_filter,
    slug,
)
from fishmerge.registry.pyfunc import FishmergeHFModel, default_pip_requirements, pickle_by_value


def find_lineage(name: str, lineage: str) -> str | None:
    """The version of `name` tagged with this lineage, if any (oldest when several)."""
    client = MlflowClient()
    found = client.search_model_versions(
        f"name = '{quote_filter(name, 'model name')}' and tags.`{LINEAGE_TAG}` = '{quote_filter(lineage, 'lineage')}'"
    )
    found = [v for v in found if v.tags.get(LINEAGE_TAG) == lineage]
    return str(min(int(v.version) for v in found)) if found else None


def register_model_dir(
    model_dir: str | Path,
    name: str,
    run_id: str,
    lineage: str,
    tags: Mapping[str, Any] | None = None,
    pip_requirements: list[str] | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> tuple[str, bool]:
    """Log the HF directory as a pyfunc in run `run_id`, register it as `name`, alias it `challenger`.

    Idempotent per lineage: when a version of `name` already carries tag fishmerge.lineage ==
    lineage, returns (that version, False) and changes nothing. Otherwise (new version, True), with
    `tags` and the lineage set on the version. The run is not ended (its owner ends it).
    `model_config` (max_length, batch_size) reaches the pyfunc's predict.
    """
    d = Path(model_dir)
    safetensors_files(d)  # refuses pickled or missing weights with the fix
    if not (d / "config.json").exists():
        raise FishmergeError(f"'{d}' has no config.json: register a Hugging Face model directory")
    existing = find_lineage(name, lineage)
    if existing is not None:
        return existing, False
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise FishmergeError(f"MLflow run '{run_id}' not found at {mlflow.get_tracking_uri()}: {exc.message}") from exc
    logged = client.create_logged_model(experiment_id=run.info.experiment_id, name="model", source_run_id=run_id)
    with pickle_by_value():
        info = mlflow.models.Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=FishmergeHFModel(),
            artifacts={MODEL_ARTIFACT: str(d.resolve())},
            pip_requirements=pip_requirements or default_pip_requirements(),
            model_config=dict(model_config or {}),
        )
    # The lineage tag is written with the version itself, so a rerun always finds the version it made.
    all_tags = {k: str(v) for k, v in {**(tags or {}), LINEAGE_TAG: lineage}.items()}
    version = str(mlflow.register_model(info.model_uri, name, tags=all_tags).version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version, True


def is_decided(name: str, version: str | int) -> bool:
    """The version's promotion decision was recorded (the last step of its registration)."""
    return DECISION_TAG in model_version(name, version).tags


def resume_registration(name: str, version: str | int) -> None:
    """Finish a registration a killed run left undecided: the newest version gets `challenger` again."""
    versions = MlflowClient().search_model_versions(f"name = '{quote_filter(name, 'model name')}'")
    if str(version) == str(max(int(v.version) for v in versions)):
        MlflowClient().set_registered_model_alias(name, CHALLENGER, str(version))


def _model_uri(name: str, alias_or_version: str | int) -> str:
    v = str(alias_or_version)
    return f"models:/{name}/{v}" if v.isdigit() else f"models:/{name}@{v}"


DOWNLOAD_MARKER = "fishmerge-download.json"  # written last into every folder download_model_dir fills


def parse_model_uri(uri: str) -> tuple[str, str]:
    """(name, alias or version) of `models:/Name@alias`, `models:/Name/<version>` or `models:/Name`
    (the champion)."""
    ref = uri.removeprefix("models:/")
    name, _, which = ref.partition("@") if "@" in ref else ref.partition("/")
    if not name or "/" in which or "@" in which:
        raise FishmergeError(f"'{uri}' is not a registry model URI: use models:/Name@alias or models:/Name/<version>")
    return name, which or CHAMPION


def resolve_version(name: str, alias_or_version: str | int):
    """The model version an alias (or number) names now."""
    v = str(alias_or_version)
    if v.isdigit():
        return model_version(name, v)
    try:
        return MlflowClient().get_model_version_by_alias(name, v)
    except MlflowException as exc:
        raise FishmergeError(
            f"cannot download models:/{name}@{v}: the alias names no version at {mlflow.get_tracking_uri()} "
            f"({exc.message})"
        ) from exc


def _downloaded(folder: Path) -> dict | None:
    """The marker of a complete download by fishmerge, or None."""
    try:
        record = json.loads((folder / DOWNLOAD_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("model_dir"), str) else None


def _download_aside(name: str, version: str, dst: Path, identity: str) -> Path:
    """Download version `version` of `name` into a new folder beside `dst` (held by a lock while it
    fills, so a killed download is recognised and removed later), checked, marker last."""
    uri = _model_uri(name, version)
    dst.parent.mkdir(parents=True, exist_ok=True)
    safety.remove_stale(dst.parent, f".{dst.name}.download-*", markers=(DOWNLOAD_MARKER,))
    tmp = dst.parent / f".{dst.name}.download-{uuid.uuid4().hex[:12]}"
    lock = safety.Lock(tmp)
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        except MlflowException as exc:
            raise FishmergeError(f"cannot download {uri}: {exc.message}") from exc
        mlmodel = local / "MLmodel"
        conf = yaml.safe_load(mlmodel.read_text()) if mlmodel.exists() else {}
        art = (conf.get("flavors", {}).get("python_function", {}).get("artifacts") or {}).get(MODEL_ARTIFACT)
        if not art:
            raise FishmergeError(f"{uri} is not a fishmerge model: its MLmodel has no '{MODEL_ARTIFACT}' artifact")
        hf = local / art["path"]
        if not (hf / "config.json").exists():
            raise FishmergeError(f"{uri}: the downloaded '{art['path']}' holds no config.json")
        record = {"name": name, "version": version, "identity": identity, "model_dir": str(hf.relative_to(tmp))}
        (tmp / DOWNLOAD_MARKER).write_text(json.dumps(record))
        lock.release()
        (tmp / safety.LOCK_NAME).unlink()
        return tmp
    except BaseException:
        lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _identity(mv) -> str:
    """What makes a downloaded version the same one: registry, name, version, its source and creation
    (a model deleted and registered again, or another server, gets another folder)."""
    key = [mlflow.get_registry_uri(), mv.name, str(mv.version), mv.source, mv.run_id, mv.creation_timestamp]
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:12]


def download_model_dir(name: str, alias_or_version: str | int, dst: str | Path) -> Path:
    """Download a registered version (alias or number) into `dst`; the plain HF directory inside it.

    The version is downloaded whole into a new folder beside `dst`, checked, then renamed into
    place, so files of two versions never mix. An existing `dst` is replaced only when it is an
    earlier download of fishmerge's (its marker) or empty; anything else is left alone (an error).
    """
    mv = resolve_version(name, alias_or_version)
    dst = Path(dst)
    version = str(mv.version)
    tmp = _download_aside(name, version, dst, _identity(mv))

    def owned(folder: Path) -> bool:  # an earlier download of fishmerge's, or nothing to lose
        return _downloaded(folder) is not None or safety.is_empty_dir(folder)

    try:
        safety.replace_owned(tmp, dst, owned, "a registry download")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst / _downloaded(dst)["model_dir"]


def resolve_model_uri(uri: str, root: str | Path) -> str:
    """The local HF folder of `models:/Name@alias` (or `models:/Name/<version>`, `models:/Name`: the
    champion) as the alias stands now: each version is downloaded once, whole, into its own folder
    `<root>/<name>/v<version>-<identity>` and reused from there; a moved alias resolves to another
    folder, so the files of two versions never mix."""
    name, which = parse_model_uri(uri)
    mv = resolve_version(name, which)
    version, identity = str(mv.version), _identity(mv)
    dst = Path(root) / slug(name) / f"v{version}-{identity}"
    record = _downloaded(dst)
    if record is None:
        tmp = _download_aside(name, version, dst, identity)
        try:
            with safety.commit_lock(dst):
                record = _downloaded(dst)  # a concurrent run may have finished the same download first
                if record is None:
                    if dst.exists() or dst.is_symlink():
                        if not safety.is_empty_dir(dst):
                            raise FishmergeError(
                                f"'{dst}' exists and is not a download of fishmerge's: move it away (it is never replaced)"
                            )
                        dst.rmdir()
                    os.rename(tmp, dst)
                    record = _downloaded(dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dst / record["model_dir"])


def model_version(name: str, version: str | int):
    try:
        return MlflowClient().get_model_version(name, str(version))
    except MlflowException as exc:
        raise FishmergeError(f"model '{name}' has no version {version}: {exc.message}") from exc
