"""The production-like stack end to end: `deployments/stack.sh up` on free loopback ports, a deployment
from prefect.yaml run by the stack's Prefect worker (once by hand, once by an interval schedule), MLflow
and Dask answering, then `down` leaving no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

from tests.integration.stack import ROOT, exports, log_tail, pipeline_config, stack, stack_env, stack_processes

PREFECT = str(ROOT / ".venv" / "bin" / "prefect") if (ROOT / ".venv" / "bin" / "prefect").exists() else "prefect"

# The deployment under test (a name in prefect.yaml) and how to deploy it: the nightly pipeline.
DEPLOYMENT = "fisher-merge-nightly"
FLOW = "fisher-merge-pipeline"
DEPLOY_ARGS: list[str] = []
RUN_TIMEOUT_S = 180  # bound on each flow run (the machine may be shared and loaded)


def run_parameters(config: Path) -> dict:
    """Parameters of one run of DEPLOYMENT."""
    return {"config": str(config)}


def wait_final(client, run_id: UUID, state: Path):
    """The flow run once it reached a final state (bounded by RUN_TIMEOUT_S)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert time.monotonic() < deadline, (
            f"flow run {run.name} still {run.state_name} after {RUN_TIMEOUT_S}s; worker log:\n"
            + log_tail(state, "prefect-worker-cpu")
        )
        time.sleep(1)


def check_completed_with_artifacts(client, run, state: Path) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    assert run.state.is_completed(), f"{run.name}: {run.state_name} {run.state.message}\n" + log_tail(
        state, "prefect-worker-cpu"
    )
    artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert artifacts, f"no artifact for flow run {run.name}"
    assert all(a.flow_run_id == run.id for a in artifacts)


def check_mlflow(uri: str, versions: int) -> None:
    """The stack's MLflow server has the pipeline run and the registered versions, aliased per policy."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("stack-test")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`fishmerge.plan_id` != ''")
    assert runs and "three/accuracy" in runs[0].data.metrics and "isotropic/two/accuracy" in runs[0].data.metrics
    for name in ("stack-test-three", "stack-test-two"):
        found = client.search_model_versions(f"name = '{name}'")
        assert len(found) == versions, [v.version for v in found]
        assert client.get_model_version_by_alias(name, "challenger").version == "1"
        assert client.get_model_version_by_alias(name, "champion").version == "1"  # the first version is promoted
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        labels = mlflow.pyfunc.load_model("models:/stack-test-two@champion").predict(["w1 w2 w3"])
    finally:
        mlflow.set_tracking_uri(before)
    assert list(labels)[0] in ("neg", "pos")


def test_stack_up_deploy_run_schedule_down(tmp_path) -> None:
    from distributed import Client
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate, DeploymentUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.monotonic()

    def mark(what: str) -> None:  # phase times in the captured stderr, for diagnosis only
        print(f"stack test: {what} at {time.monotonic() - started:.1f}s", file=sys.stderr)

    state = (tmp_path / "stack").resolve()
    env, (prefect_port, mlflow_port, dask_port) = stack_env(state)
    env |= {
        "FISHMERGE_HOME": str(ROOT),
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker polls every 2 s instead of 10
    }
    config = pipeline_config(tmp_path / "inputs")
    deploy = None
    try:
        up = stack(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        urls = exports(up.stdout)
        assert urls == {
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "FISHMERGE_DASK_ADDRESS": f"tcp://127.0.0.1:{dask_port}",
        }, up.stdout
        api = urls["PREFECT_API_URL"]
        mark("up")
        # `prefect deploy` imports the flow module (torch, transformers): start it, check the rest meanwhile.
        deploy = subprocess.Popen(
            [PREFECT, "--no-prompt", "deploy", "--name", DEPLOYMENT, *DEPLOY_ARGS],
            cwd=ROOT,
            env=env | {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-prefect-home")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        again = stack(env, "up")  # idempotent: nothing restarted, same addresses
        assert again.returncode == 0 and exports(again.stdout) == urls, again.stdout + again.stderr
        assert again.stderr.count("already running") == 6, again.stderr
        status = stack(env, "status")
        assert status.returncode == 0 and status.stdout.count(" running ") == 6, status.stdout

        with urllib.request.urlopen(urls["MLFLOW_TRACKING_URI"] + "/health", timeout=10) as r:
            assert r.read().strip() == b"OK"
        with Client(urls["FISHMERGE_DASK_ADDRESS"], timeout=30) as dask:
            dask.wait_for_workers(2, timeout=30)
            assert list(dask.run(lambda: 1).values()) == [1, 1]
            assert set(dask.run(lambda: os.environ.get("PREFECT_API_URL")).values()) == {api}
        mark("idempotent up, status, MLflow and Dask checked")

        deploy_out, _ = deploy.communicate(timeout=180)
        assert deploy.returncode == 0, deploy_out
        mark("deployed")

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            assert client.api_url.host == "127.0.0.1" and client.api_url.port == prefect_port
            dep = client.read_deployment_by_name(f"{FLOW}/{DEPLOYMENT}")
            assert dep.work_pool_name == "cpu"
            manual = client.create_flow_run_from_deployment(dep.id, parameters=run_parameters(config))
            run = wait_final(client, manual.id, state)
            check_completed_with_artifacts(client, run, state)
            mark("manual run completed")
            check_mlflow(urls["MLFLOW_TRACKING_URI"], versions=1)
            mark("MLflow run, registered version, aliases and pyfunc checked")

            # The schedule path: a 60 s interval whose first run is due 10 s from now (the server
            # schedules many runs of a short interval at once); deleted once the worker took that run.
            (schedule,) = client.create_deployment_schedules(
                dep.id,
                [
                    DeploymentScheduleCreate(
                        schedule=IntervalSchedule(
                            interval=timedelta(seconds=60), anchor_date=datetime.now(UTC) + timedelta(seconds=10)
                        ),
                        active=True,
                        parameters=run_parameters(config),
                    )
                ],
            )
            # Touching the deployment lets the server's recent-deployments scheduler (5 s loop) schedule
            # it now rather than at the main scheduler's next pass (60 s).
            client.update_deployment(dep.id, DeploymentUpdate(paused=False))
            of_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not (
                taken := [
                    r
                    for r in client.read_flow_runs(deployment_filter=of_deployment)
                    if r.auto_scheduled and r.state_type != StateType.SCHEDULED
                ]
            ):
                assert time.monotonic() < deadline, "no run of the interval schedule reached the worker"
                time.sleep(1)
            client.update_deployment_schedule(dep.id, schedule.id, active=False)
            client.delete_deployment_schedule(dep.id, schedule.id)
            assert schedule.id not in [s.id for s in client.read_deployment_schedules(dep.id)]
            waiting = client.read_flow_runs(
                deployment_filter=of_deployment,
                flow_run_filter=FlowRunFilter(state={"type": {"any_": [StateType.SCHEDULED.value]}}),
            )
            assert not [r for r in waiting if r.auto_scheduled], "scheduled runs left after the schedule was deleted"
            auto = [r.id for r in client.read_flow_runs(deployment_filter=of_deployment) if r.auto_scheduled]
            assert auto == [taken[0].id], auto
            mark("scheduled run taken by the worker, schedule deleted")
            run = wait_final(client, taken[0].id, state)
            check_completed_with_artifacts(client, run, state)
            mark("scheduled run completed")
            check_mlflow(urls["MLFLOW_TRACKING_URI"], versions=1)  # the rerun registered nothing new
    finally:
        if deploy is not None and deploy.poll() is None:
            deploy.kill()
        down = stack(env, "down", timeout=120)
        mark("down")
        left = stack_processes(state)
        for p, _ in left:  # never leave them to the next test, even when the assertion below fails
            p.kill()
        assert down.returncode == 0, down.stdout + down.stderr
        assert not left, [what for _, what in left]
        assert not list((state / "run").glob("*.pid"))
    status = stack(env, "status")
    assert status.returncode == 1 and status.stdout.count(" stopped") == 6, status.stdout
