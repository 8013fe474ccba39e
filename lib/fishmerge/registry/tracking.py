"""One MLflow run per pipeline run: params, metrics, lineage tags, nested λ candidates, artifacts;
then registration of each merged target and the promotion decision (no Prefect)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from fishmerge import registry
from fishmerge.fisher.statistics import FISHER
from fishmerge.merge.config import MergeConfig
from fishmerge.merge.plan import MergePlan
from fishmerge.pipeline.baselines import DEFAULT_METRICS, directions, task_kinds
from fishmerge.pipeline.search import varied_params


def registered_name(cfg: MergeConfig, target: str) -> str:
    """One registered model per target: <name> for a single target, <name>-<target> for several."""
    return cfg.register.name if len(cfg.target_names) == 1 else f"{cfg.register.name}-{target}"


def lineage_of(plan: MergePlan, target: str) -> str:
    """What the version was made from: the plan id covers inputs by content, method, options and λ."""
    return hashlib.sha256(f"{plan.plan_id}:{target}".encode()).hexdigest()[:24]


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """MLflow metric keys: merged metrics as `<task>/<metric>`, baselines as `<baseline>/<task>/<metric>`."""
    out = dict(results.get("merged", {}))
    for kind, values in results.items():
        if kind != "merged":
            out.update({f"{kind}/{k}": v for k, v in values.items()})
    return out


def serving_config(cfg: MergeConfig, target: str) -> dict:
    """What the registered pyfunc reads: the evaluation's max_length; for a causal LM trained on chat data,
    prompts rendered by the chat template."""
    data = next(m.data for m in cfg.models if m.name == target)
    return {
        "max_length": cfg.evaluate.max_length if cfg.evaluate else 128,
        "chat": bool(data and data.messages_field),
    }


def log_pipeline_run(
    cfg: MergeConfig,
    config_text: str,
    plan: MergePlan,
    searches: dict[str, dict],
    results: dict[str, dict[str, float]],
    merged_dirs: dict[str, str],
    tracking_uri: str,
) -> dict:
    """Log the run and its nested candidate runs, register each target, decide promotion.

    Returns {'run_id', 'experiment_id', 'decisions': {registered name: decision dict}}.
    Registration happens only after the merged folders are complete (they are renamed into place),
    so no version can point at a partial model.
    """
    experiment = cfg.mlflow.experiment or cfg.name
    exp_id = registry.use_experiment(experiment, tracking_uri)
    names = [m.name for m in plan.models]
    decisions: dict[str, dict] = {}
    registry.close_interrupted_runs(exp_id, plan.plan_id)  # left RUNNING by a killed earlier attempt
    with mlflow.start_run(
        experiment_id=exp_id, run_name=f"{cfg.name}-{plan.plan_id}", tags={"fishmerge.plan_id": plan.plan_id}
    ) as run:
        method = plan.merge_method
        fisher = {"estimator": cfg.fisher.estimator, "fisher_examples": cfg.fisher.examples}
        mlflow.log_params(
            {
                "method": plan.method,
                **method.tracked_params(plan.params),
                **(fisher if FISHER in plan.statistics else {}),
                "targets": ",".join(t.name for t in plan.targets),
                **{f"lambda/{n}": round(w, 6) for n, w in zip(names, plan.weights)},
            }
        )
        mlflow.log_metrics(flat_metrics(results))
        tags = {
            "fishmerge.plan_id": plan.plan_id,
            "fishmerge.config_hash": hashlib.sha256(config_text.encode()).hexdigest()[:16],
            **{f"fishmerge.model.{m.name}": m.fingerprint for m in plan.models},
            **{f"fishmerge.fisher.{m.name}": m.fisher_id or "" for m in plan.models},
        }
        mlflow.set_tags(tags)
        for label, s in searches.items():
            for i, c in enumerate(s["candidates"]):
                with mlflow.start_run(run_name=f"{label}-{i}", nested=True):
                    mlflow.log_params(
                        {
                            "search": label,
                            **{f"lambda/{n}": round(w, 6) for n, w in zip(names, c["weights"])},
                            **{f"param/{p}": c["params"][p] for p in varied_params(s)},
                        }
                    )
                    mlflow.log_metrics(
                        {
                            f"search/{s['metric']}": c["score"],
                            **{f"search/{t}/{s['metric']}": v for t, v in c["per_task"].items()},
                        }
                    )
                    mlflow.set_tag("fishmerge.best", str(i == s["best"]))
        mlflow.log_text(config_text, "config.yaml")
        for t, d in merged_dirs.items():
            mlflow.log_artifact(str(Path(d) / "fishmerge.json"), artifact_path=f"lineage/{t}")
        if cfg.register:
            metrics = flat_metrics(results)
            higher = directions(cfg)
            first = next(iter(higher), None)  # the first evaluated metric (accuracy; a causal LM's nll)
            kinds = task_kinds(cfg) if first is None else {}
            for t in plan.targets:
                # Default policy: the target's own task must not get worse by the first evaluated metric.
                metric = first or DEFAULT_METRICS[kinds[t.name]][0]
                policy = cfg.register.promote or {"metric": f"{t.name}/{metric}", "min_delta": 0.0, "guard": {}}
                name = registered_name(cfg, t.name)
                version, created = registry.register_model_dir(
                    merged_dirs[t.name],
                    name,
                    run.info.run_id,
                    lineage_of(plan, t.name),
                    tags={**tags, "fishmerge.target": t.name},
                    model_config=serving_config(cfg, t.name),
                )
                if created:
                    decisions[name] = registry.apply_promotion(name, version, metrics, policy, higher)
                elif not registry.is_decided(name, version):  # a killed run registered it but did not decide
                    registry.resume_registration(name, version)
                    decisions[name] = registry.apply_promotion(name, version, metrics, policy, higher)
                else:
                    decisions[name] = {
                        "version": version,
                        "decision": "unchanged",
                        "promoted": False,
                        "reason": f"identical inputs and config: version {version} already registered (lineage)",
                    }
            mlflow.set_tag("fishmerge.decisions", json.dumps({k: v["decision"] for k, v in decisions.items()}))
        return {"run_id": run.info.run_id, "experiment_id": exp_id, "decisions": decisions}


def log_report(run_id: str, files: list[str]) -> None:
    """Attach the report and plots to the pipeline run (after it is written, decisions included)."""
    client = MlflowClient()
    for f in files:
        client.log_artifact(run_id, f, artifact_path="report")
