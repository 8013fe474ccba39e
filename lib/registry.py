"""MLflow tracking, model registry and promotion of merged models (no Prefect).

Conventions (MLflow 3: stages are deprecated, so aliases and tags carry the state):
- alias `challenger`: the latest registered candidate; alias `champion`: the promoted model.
- version tags: `fishmerge.lineage` (what the model was merged from; registering the same lineage
  twice returns the existing version), `metric.<name>` (evaluation results the promotion compares),
  `fishmerge.decision` / `fishmerge.reason` / `fishmerge.champion_before` (why it was or was not promoted).
- a model version is a pyfunc whose artifact `model_dir` is the plain Hugging Face directory
  (safetensors), so it is both servable (`mlflow.pyfunc.load_model`) and downloadable as HF files.
- with a SQLite tracking store, artifacts live beside the database (`<db folder>/mlartifacts`),
  never in `./mlruns` of whatever folder the pipeline was started from.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lib import safety
from lib.checkpoint import safetensors_files
from lib.errors import FishmergeError
from lib.merge_config import check_tracking_uri

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"
LINEAGE_TAG = "fishmerge.lineage"
METRIC_TAG = "metric."
DECISION_TAG, REASON_TAG, BEFORE_TAG = "fishmerge.decision", "fishmerge.reason", "fishmerge.champion_before"
MODEL_ARTIFACT = "model_dir"
# Bounded MLflow HTTP behaviour once a server is in use (MLflow's own default retries for minutes).
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI to use: env MLFLOW_TRACKING_URI wins, else the config's value, else sqlite:///mlflow.db."""
    return check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or explicit or DEFAULT_TRACKING_URI)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the working folder for three slashes)."""
    if not uri.startswith("sqlite:"):
        return None
    rest = re.sub(r"^sqlite:/*", "", uri)
    if rest in ("", ":memory:"):
        return None
    return Path("/" + rest) if uri.startswith("sqlite:////") else Path(rest)


def check_reachable(uri: str, retries: int = 3, backoff_s: float = 1.0, timeout_s: float = 3.0) -> None:
    """Fail fast, with the fix, when the tracking store cannot be used.

    http(s): GET <uri>/health, `retries` attempts with doubling backoff, each bounded by
    `timeout_s`; also caps MLflow's own HTTP retries for the rest of the process (env defaults,
    overridable). sqlite: the database's folder exists (created if missing) and is writable.
    """
    if uri.startswith(("http://", "https://")):
        for k, v in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        last = ""
        for attempt in range(max(1, retries)):
            if attempt:
                time.sleep(backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise FishmergeError(
                        f"MLflow tracking server at {uri} refused the request ({exc.code}): set "
                        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
                    ) from exc
                if exc.code < 500:
                    return  # something answers; MLflow will report its own errors
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
        raise FishmergeError(
            f"MLflow tracking server at {uri} is unreachable after {max(1, retries)} attempts ({last}): "
            "start it (mlflow server --backend-store-uri sqlite:///mlflow.db) or fix mlflow.tracking_uri / "
            "MLFLOW_TRACKING_URI"
        )
    db = _sqlite_path(uri)
    if db is None:
        return
    folder = db.parent if str(db.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        safety.probe_writable(folder)
    except OSError as exc:
        raise FishmergeError(
            f"MLflow tracking database folder '{folder}' is not writable ({exc}): "
            "fix mlflow.tracking_uri / MLFLOW_TRACKING_URI"
        ) from exc
    if db.exists() and not os.access(db, os.W_OK):
        raise FishmergeError(f"MLflow tracking database '{db}' is read-only: fix its permissions or the tracking URI")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


def point_mlflow_at(uri: str) -> None:
    """Make `uri` MLflow's tracking URI in this process without leaking it into the environment.

    MLflow 3 also writes MLFLOW_TRACKING_URI into os.environ, which `tracking_uri()` reads first: a
    later config in the same process (tests, notebooks, a long-lived worker) would be ignored.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def use_experiment(name: str, uri: str) -> str:
    """Point MLflow (process-wide) at `uri` and experiment `name`, creating it if needed; its id.

    A new experiment on a SQLite store keeps its artifacts in `<db folder>/mlartifacts/<name>`.
    """
    point_mlflow_at(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = _sqlite_path(uri)
        location = (db.resolve().parent / "mlartifacts" / _slug(name)).as_uri() if db else None
        try:
            exp_id = client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def close_interrupted_runs(experiment_id: str, plan_id: str) -> list[str]:
    """Mark runs of this plan that a killed pipeline left RUNNING (and their nested runs) as KILLED,
    so a rerun leaves one live record of the merge, not a run that never ends."""
    client = MlflowClient()
    stale = client.search_runs(
        [experiment_id], f"tags.`fishmerge.plan_id` = '{_quote(plan_id, 'plan id')}' and attributes.status = 'RUNNING'"
    )
    closed = []
    for run in stale:
        children = client.search_runs(
            [experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'"
        )
        for r in [*children, run]:
            client.set_tag(r.info.run_id, "fishmerge.interrupted", "true")
            client.set_terminated(r.info.run_id, status="KILLED")
            closed.append(r.info.run_id)
    return closed


class FishmergeHFModel(mlflow.pyfunc.PythonModel):
    """Pyfunc over a Hugging Face sequence classifier stored as artifact `model_dir` (safetensors).

    predict: a DataFrame with column `text` (and optional `text_b` for pairs), or a list of strings
    → the predicted label names (config.id2label). Pickled by value: loading needs mlflow, torch,
    transformers and pandas, not fishmerge.
    """

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = context.artifacts["model_dir"]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        conf = dict(getattr(context, "model_config", None) or {})
        limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = min(int(conf.get("max_length", 128)), int(limit))
        self.batch_size = int(conf.get("batch_size", 32))
        self.padding = "max_length" if self.device == "cpu" else True  # fixed shapes on CPU: no re-planning

    @staticmethod
    def _columns(model_input) -> tuple[list[str], list[str] | None]:
        import pandas as pd

        if isinstance(model_input, str):
            model_input = [model_input]
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if isinstance(model_input, pd.DataFrame):
            if "text" in model_input.columns:
                text = model_input["text"]
            elif model_input.shape[1] == 1:
                text = model_input.iloc[:, 0]
            else:
                raise ValueError(
                    f"input needs a 'text' column (and optional 'text_b'), got {list(model_input.columns)}"
                )
            pair = model_input["text_b"] if "text_b" in model_input.columns else None
        else:
            text, pair = list(model_input), None
        as_str = lambda col: ["" if v is None else str(v) for v in col]  # noqa: E731
        return as_str(text), (as_str(pair) if pair is not None else None)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        # (the DataFrame hint only silences MLflow's signature inference: lists and dicts are accepted too)
        import torch

        text, pair = self._columns(model_input)
        id2label = self.model.config.id2label
        out: list[str] = []
        with torch.inference_mode():
            for s in range(0, len(text), self.batch_size):
                args = [text[s : s + self.batch_size]] + ([pair[s : s + self.batch_size]] if pair else [])
                enc = self.tokenizer(
                    *args, truncation=True, max_length=self.max_length, padding=self.padding, return_tensors="pt"
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                ids = self.model(**enc).logits.argmax(-1).tolist()
                out.extend(str(id2label.get(i, id2label.get(str(i), i))) for i in ids)
        return out


@contextmanager
def _pickle_by_value():
    """Pickle FishmergeHFModel by value, so a logged model does not need fishmerge's `lib` to load."""
    import cloudpickle

    module = sys.modules[__name__]
    registered = module.__name__ in cloudpickle.list_registry_pickle_by_value()
    if not registered:
        cloudpickle.register_pickle_by_value(module)
    quiet = logging.getLogger("mlflow.pyfunc")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the "serialized using CloudPickle" warning: deliberate here
    try:
        yield
    finally:
        quiet.setLevel(level)
        if not registered:
            cloudpickle.unregister_pickle_by_value(module)


def default_pip_requirements() -> list[str]:
    """Pinned requirements of the serving environment (explicit, so MLflow infers nothing)."""
    import pandas
    import safetensors
    import torch
    import transformers

    def pin(m) -> str:
        return m.__version__.split("+")[0]  # drop local tags such as +cpu: not on PyPI

    return [
        f"mlflow=={pin(mlflow)}",
        f"torch=={pin(torch)}",
        f"transformers=={pin(transformers)}",
        f"safetensors=={pin(safetensors)}",
        f"pandas=={pin(pandas)}",
    ]


def _quote(value: str, what: str) -> str:
    if "'" in value:
        raise FishmergeError(f"{what} '{value}' contains a single quote: MLflow filters cannot match it")
    return value


def find_lineage(name: str, lineage: str) -> str | None:
    """The version of `name` tagged with this lineage, if any (oldest when several)."""
    client = MlflowClient()
    found = client.search_model_versions(
        f"name = '{_quote(name, 'model name')}' and tags.`{LINEAGE_TAG}` = '{_quote(lineage, 'lineage')}'"
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
    with _pickle_by_value():
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
    return DECISION_TAG in _version(name, version).tags


def resume_registration(name: str, version: str | int) -> None:
    """Finish a registration a killed run left undecided: the newest version gets `challenger` again."""
    versions = MlflowClient().search_model_versions(f"name = '{_quote(name, 'model name')}'")
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


def _require(metrics: Mapping[str, float], names: list[str], whose: str) -> None:
    missing = [n for n in names if n not in metrics]
    if missing:
        raise FishmergeError(
            f"{whose} metrics lack {missing}: it has {sorted(metrics) or 'none'}; fix the promotion metric/guard "
            "names or evaluate those metrics"
        )


def decide_promotion(
    new: Mapping[str, float],
    champion: Mapping[str, float] | None,
    metric: str,
    min_delta: float = 0.0,
    guard: Mapping[str, float] | None = None,
) -> tuple[bool, str]:
    """Promote iff new[metric] ≥ champion[metric] + min_delta and, per guarded metric g with tolerance
    tol (negative = allowed drop), new[g] − champion[g] ≥ tol. No champion: promote. Reason names the numbers."""
    guard = dict(guard or {})
    _require(new, [metric, *guard], "the new model's")
    if champion is None:
        return True, f"no champion yet: promoted with {metric}={new[metric]:.6g}"
    _require(champion, [metric, *guard], "the champion's")
    need = champion[metric] + min_delta
    if new[metric] < need:
        return False, (
            f"{metric} {new[metric]:.6g} < champion {champion[metric]:.6g} + min_delta {min_delta:g} = {need:.6g}"
        )
    held = []
    for g, tol in guard.items():
        delta = new[g] - champion[g]
        if delta < tol:
            return False, (
                f"guard {g} broken: {new[g]:.6g} − champion {champion[g]:.6g} = {delta:+.6g} < tolerance {tol:+g}"
            )
        held.append(f"{g} {delta:+.6g} ≥ {tol:+g}")
    reason = f"{metric} {new[metric]:.6g} ≥ champion {champion[metric]:.6g} + min_delta {min_delta:g}"
    return True, reason + (f"; guards held: {', '.join(held)}" if held else "")


def _metrics_of(tags: Mapping[str, str]) -> dict[str, float]:
    return {k[len(METRIC_TAG) :]: float(v) for k, v in tags.items() if k.startswith(METRIC_TAG)}


def _aliases(name: str) -> dict[str, str]:
    """alias -> version of a registered model."""
    try:
        return {a: str(v) for a, v in MlflowClient().get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        raise FishmergeError(f"no registered model '{name}' at {mlflow.get_tracking_uri()}: {exc.message}") from exc


def _version(name: str, version: str | int):
    try:
        return MlflowClient().get_model_version(name, str(version))
    except MlflowException as exc:
        raise FishmergeError(f"model '{name}' has no version {version}: {exc.message}") from exc


def _policy(policy: Any, key: str, default: Any) -> Any:
    if isinstance(policy, Mapping):
        return policy.get(key, default)
    return getattr(policy, key, default)


def apply_promotion(name: str, version: str | int, metrics: Mapping[str, float], policy: Any) -> dict:
    """Record `metrics` on the version (tags metric.<name>), compare with the champion's tags, move
    `champion` only when promoting, and tag the version with the decision, reason and champion before.

    policy: a mapping or object with `metric`, `min_delta` (default 0) and `guard` ({metric: tolerance}).
    """
    client = MlflowClient()
    version = str(version)
    _version(name, version)
    metric = _policy(policy, "metric", None)
    if not metric:
        raise FishmergeError("the promotion policy names no metric: set promotion.metric (e.g. accuracy)")
    min_delta = float(_policy(policy, "min_delta", 0.0) or 0.0)
    guard = dict(_policy(policy, "guard", None) or {})
    for k, v in metrics.items():
        client.set_model_version_tag(name, version, METRIC_TAG + k, repr(float(v)))
    # The champion this decision is judged against is recorded first, so a decision interrupted by a
    # kill is made again against the same champion on rerun (idempotent), even after the alias moved.
    # (Only while the champion is still that one, or this version itself: a newer champion promoted
    # meanwhile is judged against afresh, so `champion` never moves back past it.)
    tags_now = _version(name, version).tags
    current = _aliases(name).get(CHAMPION)
    recorded = tags_now.get(BEFORE_TAG)
    recorded = None if recorded in (None, "none") else recorded
    if BEFORE_TAG in tags_now and DECISION_TAG not in tags_now and current in (recorded, version):
        before = recorded
    else:
        before = current
        client.set_model_version_tag(name, version, BEFORE_TAG, before or "none")
    if before == version:
        promote_it, decision, reason = False, "already_champion", f"version {version} is already the champion"
    else:
        champ = _metrics_of(_version(name, before).tags) if before else None
        promote_it, reason = decide_promotion(dict(metrics), champ, metric, min_delta, guard)
        decision = "promoted" if promote_it else "rejected"
        if promote_it:
            client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, REASON_TAG, reason)
    client.set_model_version_tag(name, version, DECISION_TAG, decision)  # last: the registration is complete
    return {
        "version": version,
        "decision": decision,
        "promoted": promote_it,
        "reason": reason,
        "champion_before": before,
        "champion_after": version if promote_it else before,
    }


def promote(name: str, version: str | int | None = None) -> dict:
    """Make `version` (default: the `challenger`) the champion by hand, recorded in its tags."""
    aliases = _aliases(name)
    if version is None:
        if CHALLENGER not in aliases:
            raise FishmergeError(f"model '{name}' has no '{CHALLENGER}' alias: name the version to promote")
        version = aliases[CHALLENGER]
    version = str(version)
    _version(name, version)
    before = aliases.get(CHAMPION)
    client = MlflowClient()
    client.set_registered_model_alias(name, CHAMPION, version)
    reason = f"promoted by hand (champion before: {before or 'none'})"
    for k, v in {DECISION_TAG: "promoted_by_hand", REASON_TAG: reason, BEFORE_TAG: before or "none"}.items():
        client.set_model_version_tag(name, version, k, v)
    return {"version": version, "decision": "promoted_by_hand", "reason": reason, "champion_before": before}


def history(name: str) -> list[dict]:
    """Every version of `name`, newest first: aliases, metrics, lineage, decision, created, run id."""
    by_version: dict[str, list[str]] = {}
    for alias, v in _aliases(name).items():
        by_version.setdefault(v, []).append(alias)
    versions = MlflowClient().search_model_versions(f"name = '{_quote(name, 'model name')}'")
    out = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        out.append(
            {
                "version": str(v.version),
                "aliases": sorted(by_version.get(str(v.version), [])),
                "metrics": _metrics_of(v.tags),
                "lineage": v.tags.get(LINEAGE_TAG),
                "decision": v.tags.get(DECISION_TAG),
                "reason": v.tags.get(REASON_TAG),
                "created": datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
                "run_id": v.run_id,
                "tags": dict(v.tags),
            }
        )
    return out
