"""The MLflow connection: tracking URI, reachability (bounded retries), experiments, tag names.

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

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fishmerge.errors import FishmergeError
from fishmerge.io import safety
from fishmerge.merge.config import check_tracking_uri

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"
LINEAGE_TAG = "fishmerge.lineage"
METRIC_TAG = "metric."
DECISION_TAG, REASON_TAG, BEFORE_TAG = "fishmerge.decision", "fishmerge.reason", "fishmerge.champion_before"
MODEL_ARTIFACT = "model_dir"
# Bounded MLflow HTTP behaviour once a server is in use (MLflow's own default retries for minutes).
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def quote_filter(value: str, what: str) -> str:
    if "'" in value:
        raise FishmergeError(f"{what} '{value}' contains a single quote: MLflow filters cannot match it")
    return value


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


def slug(name: str, empty: str = "model") -> str:
    """A name as one safe path component (never empty, never `.` or `..`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or empty


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
        location = (db.resolve().parent / "mlartifacts" / slug(name, "experiment")).as_uri() if db else None
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
        [experiment_id],
        f"tags.`fishmerge.plan_id` = '{quote_filter(plan_id, 'plan id')}' and attributes.status = 'RUNNING'",
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
