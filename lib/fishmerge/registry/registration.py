"""Registering merged model folders as MLflow model versions (idempotent by lineage) and downloading them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fishmerge.errors import FishmergeError
from fishmerge.io.checkpoint import safetensors_files
from fishmerge.registry.connection import CHALLENGER, DECISION_TAG, LINEAGE_TAG, MODEL_ARTIFACT, quote_filter
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


def download_model_dir(name: str, alias_or_version: str | int, dst: str | Path) -> Path:
    """Download a registered version (alias or number) into `dst`; the plain HF directory inside it."""
    uri = _model_uri(name, alias_or_version)
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
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
    return hf


def model_version(name: str, version: str | int):
    try:
        return MlflowClient().get_model_version(name, str(version))
    except MlflowException as exc:
        raise FishmergeError(f"model '{name}' has no version {version}: {exc.message}") from exc
