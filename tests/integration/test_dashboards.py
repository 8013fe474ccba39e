"""The dashboards as a person sees them: the stack up (`deployments/stack.sh`), the pipeline run through
the CLI against it, then headless Chromium loads the Prefect UI (the flow run, its artifacts: the report
with its plots, the λ table) and the MLflow UI (the registered model's versions and aliases, a plot among
the run's artifacts) and checks what they render. Screenshots go to the test's folder, and also to
$FISHMERGE_DASHBOARD_SHOTS when set (how docs/img is refreshed).

Marker `dashboard`; skipped, with the reason, where Debian's chromium is not installed."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import browser
from tests.integration.stack import exports, log_tail, pipeline_config, stack, stack_env, stack_processes

pytestmark = [pytest.mark.dashboard, pytest.mark.skipif(not browser.available(), reason=browser.MISSING)]

NAME = "stack-test"  # the config's name: experiment, artifact keys, registered models stack-test-<target>
RUN_TIMEOUT_S = 600


def png_width(path: Path) -> int:
    """Pixel width from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">I", head[16:20])[0]


def prefect_ids(api: str) -> tuple[str, str, dict[str, str]]:
    """The pipeline's flow run (id, name) and its artifacts {key: id}, through the API: what to open."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["fisher-merge-pipeline"])))
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return str(run.id), run.name, {a.key: str(a.id) for a in arts}


def mlflow_ids(uri: str) -> tuple[str, str]:
    """(experiment id, run id) of the pipeline's MLflow run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(NAME)
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`fishmerge.plan_id` != ''")
    return exp.experiment_id, run.info.run_id


def test_prefect_and_mlflow_uis_render_the_pipeline_run(tmp_path) -> None:
    state = (tmp_path / "stack").resolve()
    env, _ = stack_env(state)
    config = pipeline_config(tmp_path / "inputs")
    shots = tmp_path / "screenshots"
    try:
        up = stack(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        urls = exports(up.stdout)
        run = subprocess.run(
            [sys.executable, "-m", "fishmerge.flows.cli", "run", str(config), "--no-progress"],
            env=env | urls,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            cwd=tmp_path,  # the run's relative folders (runs, cache) stay in the test's folder
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        summary = json.loads((tmp_path / "inputs" / "merged" / "pipeline.json").read_text())
        prefect_ui = urls["PREFECT_API_URL"].removesuffix("/api")
        mlflow_ui = urls["MLFLOW_TRACKING_URI"]
        flow_run_id, flow_run_name, artifacts = prefect_ids(urls["PREFECT_API_URL"])
        report_key, table_key = f"{NAME}-report", f"{NAME}-lambda-fisher"
        assert {report_key, table_key, f"{NAME}-lambda-isotropic"} <= set(artifacts), artifacts
        experiment_id, mlflow_run_id = mlflow_ids(mlflow_ui)

        with browser.chromium() as page:
            # Prefect: the flow run page (state, graph), then its Artifacts tab.
            page.open(f"{prefect_ui}/runs/flow-run/{flow_run_id}")
            page.wait_text(flow_run_name, "Completed", "pipeline-report", "Artifacts")
            (tab,) = page.elements("li.p-tab#artifacts")
            tab.click()
            page.wait_text(report_key, "fishmerge pipeline report", table_key, "λ candidates (fisher)")
            page.screenshot(shots / "prefect_flow_run_artifacts.png")

            # The report artifact: its tables rendered, and the four plots shown as images.
            page.open(f"{prefect_ui}/artifacts/artifact/{artifacts[report_key]}")
            shown = page.wait_text(
                f"fishmerge pipeline: {NAME}", "Methods side by side", "Results", "Registry and promotion"
            )
            assert "three/accuracy ↑" in shown and "two/f1 ↑" in shown
            assert f"{NAME}-three v1 promoted" in shown and f"{NAME}-two v1 promoted" in shown
            plots = sorted(p.name for p in (tmp_path / "inputs" / "merged").glob("*.png"))
            assert len(plots) == 4, plots  # λ curve, per-task bars, Fisher mass of each target

            def four_plots() -> list[int] | None:
                widths = [w for src, w in page.shown_images() if src.startswith("data:image/png")]
                return widths if len(widths) == len(plots) else None

            inline = page.wait("the report's four plots as images", four_plots)
            report_plots = sorted(png_width(tmp_path / "inputs" / "merged" / p) for p in plots)
            assert sorted(inline) == report_plots  # each decoded at its own size
            page.screenshot(shots / "prefect_report.png")
            page.scroll_to(page.elements('img[src^="data:image/png"]')[0])
            page.screenshot(shots / "prefect_report_plots.png")

            # The λ table artifact: one row per candidate, its score, the winner marked.
            page.open(f"{prefect_ui}/artifacts/artifact/{artifacts[table_key]}")
            page.wait_text("λ candidates (fisher)", "lambda_three", "lambda_two", "accuracy", "best")
            search = summary["searches"]["fisher"]

            def candidate_rows() -> list[str] | None:
                rows = [e.text for e in page.elements("table tbody tr")]
                return rows if len(rows) == len(search["candidates"]) else None

            rows = page.wait("one table row per candidate", candidate_rows)
            for i, (row, cand) in enumerate(zip(rows, search["candidates"], strict=True)):
                cells = row.split()
                assert cells[0] == str(i) and float(cells[3]) == pytest.approx(cand["score"], abs=1e-4), row
                assert cells[4] == ("true" if i == search["best"] else "false"), row
            page.screenshot(shots / "prefect_lambda_table.png")

            # MLflow: the registered model, its version and both aliases.
            page.open(f"{mlflow_ui}/#/models/{NAME}-three")
            page.wait_text(f"{NAME}-three", "Versions", "Version 1", "Aliases", "@ challenger", "@ champion")
            page.screenshot(shots / "mlflow_registered_model.png")

            # MLflow: the λ curve among the run's artifacts, shown as an image.
            page.open(
                f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{mlflow_run_id}/artifacts/report/lambda_curve.png"
            )
            page.wait_text("lambda_curve.png", "report.md", "tasks.png")
            widths = page.wait(
                "the λ curve as an image",
                lambda: [w for src, w in page.shown_images('img[alt="report/lambda_curve.png"]')],
            )
            assert widths[0] == png_width(tmp_path / "inputs" / "merged" / "lambda_curve.png")
            page.screenshot(shots / "mlflow_run_artifact.png")
        if os.environ.get("FISHMERGE_DASHBOARD_SHOTS"):
            shutil.copytree(shots, os.environ["FISHMERGE_DASHBOARD_SHOTS"], dirs_exist_ok=True)
    finally:
        down = stack(env, "down", timeout=120)
        left = stack_processes(state)
        for p, _ in left:
            p.kill()
        assert down.returncode == 0, down.stdout + down.stderr + log_tail(state, "prefect-server")
        assert not left, [what for _, what in left]
