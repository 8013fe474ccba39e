"""The flows' plumbing on tiny models, without search or evaluation (fast): bad input raised by tasks
and never retried, one readable failure; `fishmerge run` merges with the λ `fishmerge merge` uses;
`models:/Name@alias` inputs follow a moved alias; no flow or task spells a merge method's name.
Real Prefect (the session's test server), MLflow (SQLite), safetensors; no mocks.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from fishmerge import registry
from fishmerge.errors import FishmergeError
from fishmerge.flows.cli import main
from fishmerge.flows.merge import merge_models
from fishmerge.merge.methods import METHODS
from fishmerge.tasks import fails_on_bad_input, not_bad_input
from mlflow import MlflowClient
from prefect import flow, task
from safetensors.numpy import load_file

from tests.conftest import save_model_dir
from tests.integration.test_merge_cli import write_fisher

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A 'pretrained' base and two 'fine-tunings' (other seeds) of one tiny BERT classifier."""
    root = tmp_path_factory.mktemp("flow-models")
    return {name: save_model_dir(root / name, "bert-cls2", seed=i) for i, name in enumerate(("base", "a", "b"))}


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Path:
    """The test's folder as the working folder (fishmerge's ./.fishmerge), no tracking URI from the env."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def config(ws: Path, file: str, models: list[dict], **extra) -> Path:
    cfg = {
        "name": "flow-t",
        "method": "task_arithmetic",
        "models": models,
        "output": str(ws / "out"),
        "mlflow": {"tracking_uri": f"sqlite:///{ws / 'mlflow.db'}", "experiment": "flow-tests"},
        **extra,
    }
    (ws / file).write_text(json.dumps(cfg))  # JSON is YAML
    return ws / file


def tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(got: Path, want: Path) -> None:
    g, w = tensors(got), tensors(want)
    assert set(g) == set(w)
    for k in w:
        np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def task_runs(state) -> dict[str, list]:
    """The task runs of a finished flow run, by task name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.name.rsplit("-", 1)[0], []).append(r)
    return out


# --- bad input: raised by the task, not retried, one Failed state with the one-line message --------


def test_bad_input_is_not_retried_and_bugs_are() -> None:
    calls: list[str] = []

    @task(retries=2, retry_condition_fn=not_bad_input)
    def bad_input() -> None:
        calls.append("bad")
        raise FishmergeError("fix the config")

    @task(retries=2, retry_condition_fn=not_bad_input)
    def flaky() -> str:
        calls.append("flaky")
        if calls.count("flaky") < 3:
            raise RuntimeError("transient")
        return "ok"

    @flow
    @fails_on_bad_input
    def both() -> None:
        assert flaky() == "ok"
        bad_input()

    state = both(return_state=True)
    assert state.is_failed() and state.message == "fix the config"
    assert calls == ["flaky"] * 3 + ["bad"]


def test_a_failing_merge_task_raises_once_and_fails_the_flow_with_one_line(models, ws, capsys) -> None:
    """NaN Fisher values are found by merge-execute (retries=1): the task fails (it used to complete
    with an {'error': …} result), is not retried, and the flow fails with the message alone."""
    fa, fb = write_fisher(models["a"], 1), write_fisher(models["b"], 2, nan_key="bert.pooler.dense.weight")
    cfg = config(
        ws,
        "nan.yaml",
        [
            {"name": "a", "path": str(models["a"]), "weight": 0.5, "fisher": str(fa)},
            {"name": "b", "path": str(models["b"]), "weight": 0.5, "fisher": str(fb)},
        ],
        method="fisher",
    )
    capsys.readouterr()
    state = merge_models(config=str(cfg), return_state=True)
    err = capsys.readouterr().err
    assert state.is_failed()
    assert "NaN/Inf" in state.message and "bert.pooler.dense.weight" in state.message
    assert "Traceback" not in state.message and "Traceback" not in err, err
    runs = task_runs(state)
    [execute] = runs["merge-execute"]
    assert execute.state.is_failed() and execute.run_count == 1  # bad input: no retry
    assert len(runs["merge-plan"]) == 1  # the plan is made once, for the execution too
    assert not (ws / "out").exists()


def test_bad_input_in_the_tracking_task_fails_the_run_once(models, ws, capsys) -> None:
    """pipeline-track (retries=2) on a promotion metric nothing measured: one FishmergeError, no retry,
    `fishmerge run` prints one error line and exits 2."""
    cfg = config(
        ws,
        "track.yaml",
        [{"name": n, "path": str(models[n]), "weight": 0.5} for n in ("a", "b")],
        method="isotropic",
        targets=["a"],
        register={"name": "flow-track"},  # default policy: a/accuracy, but nothing is evaluated
    )
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fishmerge: error:")]
    assert len(errors) == 1 and "metrics lack ['a/accuracy']" in errors[0], err
    assert "Traceback" not in err

    from fishmerge.flows.pipeline import fisher_merge_pipeline

    state = fisher_merge_pipeline(config=str(cfg), return_state=True)
    assert state.is_failed() and "metrics lack ['a/accuracy']" in state.message
    [track] = task_runs(state)["pipeline-track"]
    assert track.state.is_failed() and track.run_count == 1


# --- defect: `fishmerge run` normalised λ for every method -------------------------------------------


def test_run_merges_with_the_weights_merge_uses(models, ws, capsys) -> None:
    """task_arithmetic takes λ as given (0.6 + 0.6 = 1.2): `fishmerge run` without `search:` normalised
    them to 0.5/0.5, so the same config merged two ways. Now both write the same tensors."""
    merge_models_cfg = [{"name": n, "path": str(models[n]), "weight": 0.6} for n in ("a", "b")]
    ran = config(ws, "run.yaml", merge_models_cfg, base=str(models["base"]), output=str(ws / "out-run"))
    merged = config(ws, "merge.yaml", merge_models_cfg, base=str(models["base"]), output=str(ws / "out-merge"))
    assert main(["run", str(ran), "--no-progress"]) == 0, capsys.readouterr().err
    assert main(["merge", str(merged), "--no-progress"]) == 0, capsys.readouterr().err
    for t in ("a", "b"):
        assert_same_tensors(ws / "out-run" / t, ws / "out-merge" / t)
    summary = json.loads((ws / "out-run" / "pipeline.json").read_text())
    assert summary["weights"] == {"a": 0.6, "b": 0.6}


# --- defect: models:/Name@alias read stale files after the alias moved --------------------------------


def register_version(model_dir: Path, name: str, uri: str, lineage: str) -> str:
    registry.use_experiment("flow-sources", uri)
    run = MlflowClient().create_run(mlflow.get_experiment_by_name("flow-sources").experiment_id)
    version, _ = registry.register_model_dir(model_dir, name, run.info.run_id, lineage)
    return version


def test_pipeline_follows_a_moved_alias(models, ws, tmp_path_factory, capsys) -> None:
    """Model b comes from the registry as models:/flow-src@champion. Version 1 is a sharded checkpoint,
    version 2 a single file (another fine-tuning). Before, version 2 was downloaded over version 1's
    folder and its stale index still named version 1's shards: the merge read version 1."""
    from transformers import AutoModelForSequenceClassification

    src = tmp_path_factory.mktemp("flow-src")
    v1 = src / "v1" / "b"  # same folder name for both versions, as a pipeline's <output>/<target> is
    save_model_dir(v1, "bert-cls2", seed=2)
    (v1 / "model.safetensors").unlink()
    AutoModelForSequenceClassification.from_pretrained(models["b"]).save_pretrained(v1, max_shard_size="40KB")
    assert len(list(v1.glob("model-*-of-*.safetensors"))) > 1
    v2 = save_model_dir(src / "v2" / "b", "bert-cls2", seed=7)
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    assert register_version(v1, "flow-src", uri, "v1") == "1"
    assert register_version(v2, "flow-src", uri, "v2") == "2"

    def merge_with(b: str, file: str, output: str) -> Path:
        entries = [{"name": "a", "path": str(models["a"]), "weight": 0.5}, {"name": "b", "path": b, "weight": 0.5}]
        return config(ws, file, entries, method="isotropic", targets=["a"], output=str(ws / output))

    pipeline_cfg = merge_with("models:/flow-src@champion", "alias.yaml", "out-alias")
    for version, local in (("1", v1), ("2", v2)):
        MlflowClient(uri).set_registered_model_alias("flow-src", "champion", version)
        assert main(["run", str(pipeline_cfg), "--no-progress"]) == 0, capsys.readouterr().err
        reference = merge_with(str(local), f"local-{version}.yaml", f"out-local-{version}")
        assert main(["merge", str(reference), "--no-progress"]) == 0, capsys.readouterr().err
        assert_same_tensors(ws / "out-alias" / "a", ws / f"out-local-{version}" / "a")


# --- no flow or task spells a merge method's name -------------------------------------------------------


def test_flows_and_tasks_name_no_merge_method() -> None:
    """Which method merges is the config's and the method registry's business (the merge and pipeline
    flows and their tasks); the references' plan method is named once, in fishmerge.pipeline.baselines."""
    found = []
    for path in [REPO / f for f in ("flows/merge.py", "flows/pipeline.py", "tasks/merge.py", "tasks/pipeline.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in METHODS:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not found, found
