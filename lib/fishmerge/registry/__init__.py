"""MLflow: the connection (tracking URI, experiments), registration of merged models, the promotion
policy, the served pyfunc, and the pipeline's tracked run. No Prefect."""

from fishmerge.registry.connection import (
    BEFORE_TAG,
    CHALLENGER,
    CHAMPION,
    DECISION_TAG,
    DEFAULT_TRACKING_URI,
    LINEAGE_TAG,
    METRIC_TAG,
    REASON_TAG,
    check_reachable,
    close_interrupted_runs,
    point_mlflow_at,
    tracking_uri,
    use_experiment,
)
from fishmerge.registry.promotion import apply_promotion, decide_promotion, history, promote
from fishmerge.registry.registration import (
    download_model_dir,
    find_lineage,
    is_decided,
    register_model_dir,
    resolve_model_uri,
    resume_registration,
)

__all__ = [
    "BEFORE_TAG",
    "CHALLENGER",
    "CHAMPION",
    "DECISION_TAG",
    "DEFAULT_TRACKING_URI",
    "LINEAGE_TAG",
    "METRIC_TAG",
    "REASON_TAG",
    "apply_promotion",
    "check_reachable",
    "close_interrupted_runs",
    "decide_promotion",
    "download_model_dir",
    "find_lineage",
    "history",
    "is_decided",
    "point_mlflow_at",
    "promote",
    "register_model_dir",
    "resolve_model_uri",
    "resume_registration",
    "tracking_uri",
    "use_experiment",
]
