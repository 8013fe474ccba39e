"""`fishmerge run` end to end on two tiny BERTs fine-tuned from one body on keyword tasks.

λ search against a brute-force reference (own numpy Fisher merge, own accuracy), the MLflow run
(nested candidates, params, metrics, lineage tags), registration with aliases, pyfunc serving,
report and plots, idempotent reruns, promotion rejected by metric and by guard, an unreachable and
a stopped MLflow server, `fishmerge promote` / `fishmerge history`. Real Prefect, MLflow, Zarr.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from fishmerge import registry
from fishmerge.flows.cli import main
from fishmerge.flows.pipeline import run_pipeline
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from tests.conftest import WORDS, save_model_dir
from tests.integration.conftest import pipeline_workspace
from tests.integration.stack import free_ports

KEYWORDS = {"a": "w1", "b": "w2"}  # task of model a: does the text contain w1? of b: w2?
FILL = [w for w in WORDS[5:]]
MAX_LENGTH = 16
SEARCH_LIMIT = 16
FLOOR = 1e-6


def keyword_rows(n: int, keyword: str, seed: int) -> list[dict]:
    """Random word sequences; every other row has `keyword` inserted and label 1."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILL) for _ in range(rng.randint(3, 7))]
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), keyword)
        rows.append({"text": " ".join(words), "label": i % 2})
    return rows


def finetune(model_dir: Path, rows: list[dict], seed: int, steps: int = 20) -> None:
    """A few full-batch Adam steps, saved over the model (so the tasks are learnt and merges differ)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(
        [r["text"] for r in rows], padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    labels = torch.tensor([r["label"] for r in rows])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(model_dir, safe_serialization=True)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Workspace: cwd (fishmerge's ./.fishmerge caches), models a and b, their datasets; no env tracking URI."""
    import datasets

    root = tmp_path_factory.mktemp("pipeline")
    with pipeline_workspace(root):
        for i, (name, keyword) in enumerate(KEYWORDS.items()):
            rows = keyword_rows(96, keyword, seed=10 + i)
            d = save_model_dir(root / name, "bert-cls2", seed=0)  # one "pretrained" body, two fine-tunings
            finetune(d, rows[:48], seed=i + 1)
            ds = datasets.Dataset.from_list
            datasets.DatasetDict(
                {"train": ds(rows[:48]), "validation": ds(rows[48:72]), "test": ds(rows[72:])}
            ).save_to_disk(str(root / f"data-{name}"))
        yield root


def write_config(
    ws: Path,
    file: str,
    uri: str,
    *,
    output: str = "out",
    register: str = "fm-pipe",
    search: bool = True,
    weights: tuple[float, float] = (0.5, 0.5),
    targets: list[str] | None = None,
    promote: dict | None = None,
    baselines: list[str] | None = None,
    fisher: dict | None = None,
) -> Path:
    models = [
        {
            "name": name,
            "path": name,
            "weight": w,
            "data": {"path": f"data-{name}", "fisher_split": "train", "eval_split": "test"},
        }
        for name, w in zip(KEYWORDS, weights)
    ]
    cfg: dict = {
        "name": "fm-pipe",
        "method": "fisher",
        "models": models,
        "fisher": {
            "estimator": "exact",
            "examples": 16,
            "max_length": MAX_LENGTH,
            "store_root": "fishers",
            **(fisher or {}),
        },
        "output": output,
        "evaluate": {"max_length": MAX_LENGTH, "batch_size": 16},
        "register": {"name": register, "promote": promote or {"metric": "a/accuracy"}},
        "mlflow": {"tracking_uri": uri, "experiment": "fm-pipe-tests"},
    }
    if search:
        cfg["search"] = {"points": 3, "limit": SEARCH_LIMIT}
    if targets:
        cfg["targets"] = targets
    if baselines is not None:
        cfg["evaluate"]["baselines"] = baselines
    path = ws / file
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def first(ws):
    """The full pipeline once: 2 targets, λ grid of 3, every baseline, SQLite tracking store."""
    uri = f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"
    cfg = write_config(ws, "p.yaml", uri)
    result = run_pipeline(str(cfg))
    return {"cfg": cfg, "uri": uri, "result": result}


def versions(uri: str, name: str) -> list[str]:
    return sorted(str(v.version) for v in MlflowClient(uri).search_model_versions(f"name = '{name}'"))


def aliases(uri: str, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in MlflowClient(uri).get_registered_model(name).aliases.items()}


# --- 1. λ search against a brute-force reference -------------------------------------------------


def accuracy_by_hand(model_dir: Path, state: dict[str, torch.Tensor], data: Path, split: str, limit: int) -> float:
    """A fresh model from `model_dir` with `state` loaded over it; argmax accuracy on the first `limit` rows."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    loaded = model.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys
    assert all(k.startswith("classifier.") for k in loaded.missing_keys if k in model.state_dict())
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = datasets.load_from_disk(str(data))[split]
    rows = rows.select(range(min(limit, len(rows))))
    enc = tok(list(rows["text"]), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        preds = model(**enc).logits.argmax(-1).numpy()
    return float(np.mean(preds == np.asarray(rows["label"])))


def reference_search(ws: Path, fishers: dict[str, str]) -> list[dict]:
    """For each grid λ: own Fisher merge (numpy, float64) per target, accuracy by hand on the search rows."""
    import zarr
    from safetensors.numpy import load_file

    names = list(KEYWORDS)
    thetas = [load_file(str(ws / n / "model.safetensors")) for n in names]
    shared = [
        k
        for k in thetas[0]
        if k.startswith("bert.") and all(k in t and t[k].shape == thetas[0][k].shape for t in thetas)
    ]
    assert shared and not any(k.startswith("classifier.") for k in shared)
    stores = [zarr.open_group(fishers[n], mode="r") for n in names]
    fish = [{k: np.asarray(s[k][...], dtype=np.float64) for k in shared} for s in stores]
    out = []
    for w in (0.0, 0.5, 1.0):  # grid of 3 for 2 models: λ_a = 0, 1/2, 1
        lam = np.array([w, 1.0 - w])
        per_task, states = {}, {}
        for t, target in enumerate(names):
            state = {}
            for k in shared:
                ft = [np.maximum(f[k], FLOOR) if i == t else f[k] for i, f in enumerate(fish)]  # favor_target
                num = sum(lam[i] * ft[i] * thetas[i][k].astype(np.float64) for i in range(len(names)))
                den = sum(lam[i] * ft[i] for i in range(len(names)))
                theta_t = thetas[t][k].astype(np.float64)
                merged = np.where(den > 0, num / np.where(den > 0, den, 1.0), theta_t)
                state[k] = torch.from_numpy(merged.astype(np.float32))
            states[target] = state
            per_task[target] = accuracy_by_hand(ws / target, state, ws / f"data-{target}", "validation", SEARCH_LIMIT)
        out.append(
            {
                "weights": [float(x) for x in lam],
                "score": float(np.mean(list(per_task.values()))),
                "per_task": per_task,
                "states": states,
            }
        )
    return out


def logged_candidates(uri: str, run_id: str, search: str) -> list[dict]:
    """The nested candidate runs of one search, in λ_a order: weights and search score."""
    client = MlflowClient(uri)
    exp = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    cands = [
        {
            "weights": [float(r.data.params[f"lambda/{n}"]) for n in KEYWORDS],
            "score": r.data.metrics["search/accuracy"],
            "best": r.data.tags["fishmerge.best"] == "True",
            "per_task": {n: r.data.metrics[f"search/{n}/accuracy"] for n in KEYWORDS},
        }
        for r in runs
        if r.data.params.get("search") == search
    ]
    return sorted(cands, key=lambda c: c["weights"][0])


def test_lambda_search_picks_the_brute_force_best(ws, first) -> None:
    result = first["result"]
    ref = reference_search(ws, result["fishers"])
    scores = [c["score"] for c in ref]
    assert len(set(scores)) > 1, f"every candidate scores {scores}: the tasks are not learnt, the test is weak"
    best = next(i for i, s in enumerate(scores) if s == max(scores))  # first best wins ties
    assert [result["weights"][n] for n in KEYWORDS] == pytest.approx(ref[best]["weights"], abs=1e-9)

    logged = logged_candidates(first["uri"], result["run_id"], "fisher")
    assert [c["weights"] for c in logged] == [c["weights"] for c in ref]
    assert [c["score"] for c in logged] == pytest.approx(scores, abs=1e-12)
    assert [c["best"] for c in logged] == [i == best for i in range(len(ref))]
    for c, r in zip(logged, ref):
        assert c["per_task"] == pytest.approx(r["per_task"], abs=1e-12)

    # the out-of-core merge used that λ: merged tensors as the reference's, heads the targets' own
    from safetensors.numpy import load_file

    for target, state in ref[best]["states"].items():
        written = load_file(str(Path(result["targets"][target]) / "model.safetensors"))
        own = load_file(str(ws / target / "model.safetensors"))
        assert set(written) == set(own)
        for k, v in written.items():
            want = state[k].numpy() if k in state else own[k]
            np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6, err_msg=k)
        # and the evaluation of the merged model (test split, every row) is this accuracy
        test_acc = accuracy_by_hand(ws / target, state, ws / f"data-{target}", "test", 10**6)
        assert result["results"]["merged"][f"{target}/accuracy"] == pytest.approx(test_acc, abs=1e-12)


# --- 2. MLflow run, registry, serving, report, idempotent rerun ------------------------------------


def test_mlflow_run_registry_serving_and_report(ws, first) -> None:
    uri, result = first["uri"], first["result"]
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    for n in KEYWORDS:
        assert float(params[f"lambda/{n}"]) == pytest.approx(result["weights"][n], abs=1e-6)
        assert tags[f"fishmerge.model.{n}"] and tags[f"fishmerge.fisher.{n}"]
        for kind in ("", "isotropic/", "originals/", "ensemble/"):
            for m in ("accuracy", "f1"):
                assert 0.0 <= metrics[f"{kind}{n}/{m}"] <= 1.0
        assert metrics[f"{n}/accuracy"] == result["results"]["merged"][f"{n}/accuracy"]
    assert params["method"] == "fisher" and tags["fishmerge.plan_id"]
    assert json.loads(tags["fishmerge.decisions"]) == {"fm-pipe-a": "promoted", "fm-pipe-b": "promoted"}
    nested = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert sorted(r.data.params["search"] for r in nested) == ["fisher"] * 3 + ["isotropic"] * 3
    iso = logged_candidates(uri, result["run_id"], "isotropic")
    best_iso = next(c for c in iso if c["best"])["weights"]
    assert [result["compared"]["isotropic"]["weights"][n] for n in KEYWORDS] == pytest.approx(best_iso, abs=1e-6)

    for name in ("fm-pipe-a", "fm-pipe-b"):
        assert versions(uri, name) == ["1"]
        assert aliases(uri, name) == {"champion": "1", "challenger": "1"}
        assert result["decisions"][name]["decision"] == "promoted"
        mv = client.get_model_version(name, "1")
        assert mv.tags["fishmerge.plan_id"] == tags["fishmerge.plan_id"] and mv.tags["fishmerge.lineage"]
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/fm-pipe-a@champion").predict(["w1 w2", "w3 w4 w5"])
    assert len(served) == 2 and set(served) <= {"neg", "pos"}

    out = Path(result["output"])
    assert Path(result["report"]) == out / "report.md"
    report = (out / "report.md").read_text()
    assert "fm-pipe-a" in report and "promoted" in report and "isotropic" in report
    pngs = ("lambda_curve.png", "tasks.png", "fisher_mass_a.png", "fisher_mass_b.png")
    for png in pngs:
        assert (out / png).stat().st_size > 1000, png
        assert f"({png})" in report, png  # report.md shows the plot beside it
    # The Prefect artifact carries the same plots inline: the UI shows them without the files.
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fm-pipe-report"]))
        )
    newest = max(artifacts, key=lambda a: a.created)  # this run's (the session may hold earlier versions)
    shown = re.findall(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", newest.data)
    assert [base64.b64decode(b) for b in shown] == [(out / png).read_bytes() for png in pngs]
    for n in KEYWORDS:
        assert (out / n / "model.safetensors").exists() and (out / n / "config.json").exists()
    assert not (ws / "mlruns").exists()  # artifacts beside the SQLite database
    assert list((ws / "mlflow" / "mlartifacts").rglob("model.safetensors"))


def test_rerun_of_the_same_config_registers_nothing(ws, first, capsys) -> None:
    capsys.readouterr()
    assert main(["run", str(first["cfg"]), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "fm-pipe-a: version 1 unchanged" in err and "fm-pipe-b: version 1 unchanged" in err
    for name in ("fm-pipe-a", "fm-pipe-b"):
        assert versions(first["uri"], name) == ["1"]
        assert aliases(first["uri"], name) == {"champion": "1", "challenger": "1"}


def test_a_version_left_undecided_by_a_kill_gets_its_decision_on_rerun(ws, first, capsys) -> None:
    """Issue 11 item 5: a kill right after registration (version created with its lineage and the
    `challenger` alias, no decision, no `champion`) was never repaired: every rerun said "unchanged".
    The state is made here as the kill leaves it (decision tags and champion removed, real MLflow)."""
    client = MlflowClient(first["uri"])
    for name in ("fm-pipe-a", "fm-pipe-b"):
        for tag in (registry.DECISION_TAG, registry.REASON_TAG, registry.BEFORE_TAG):
            client.delete_model_version_tag(name, "1", tag)
        client.delete_registered_model_alias(name, "champion")
    capsys.readouterr()
    assert main(["run", str(first["cfg"]), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "fm-pipe-a: version 1 promoted" in err and "fm-pipe-b: version 1 promoted" in err, err
    for name in ("fm-pipe-a", "fm-pipe-b"):
        assert versions(first["uri"], name) == ["1"]
        assert aliases(first["uri"], name) == {"champion": "1", "challenger": "1"}
        assert client.get_model_version(name, "1").tags[registry.DECISION_TAG] == "promoted"


def test_a_fisher_variant_reuses_the_isotropic_search_and_baselines(ws, first) -> None:
    """Another floor changes only the Fisher merge: the isotropic search and the baseline evaluation
    (no Fisher in them) come from the cache, the Fisher search and the merged evaluation do not."""
    cache = ws / ".fishmerge" / "cache"
    before = set(p.name for p in cache.iterdir())
    cfg = write_config(
        ws, "p-floor.yaml", first["uri"], output="out-floor", register="fm-floor", fisher={"floor": 0.01}
    )
    result = run_pipeline(str(cfg))
    summary = json.loads((ws / "out-floor" / "pipeline.json").read_text())
    assert summary["searches"]["isotropic"]["cached"] is True
    assert summary["searches"]["fisher"]["cached"] is False
    new_kinds = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir() if p.name not in before)
    assert new_kinds == ["evaluate-merged", "search"], new_kinds  # the Fisher search and merged evaluation only
    for kind in ("originals", "isotropic", "ensemble"):
        assert result["results"][kind] == first["result"]["results"][kind]
    assert result["compared"]["isotropic"] == first["result"]["compared"]["isotropic"]


# --- 3. promotion decided by the pipeline --------------------------------------------------------


@pytest.fixture(scope="module")
def rejected(ws, first):
    """Two more runs of target a (registered as fm-pipe-a: one target → the register name itself),
    without search, other λ: one cannot meet min_delta 1.0, one breaks an impossible guard."""
    uri = first["uri"]
    by_metric = write_config(
        ws,
        "p-delta.yaml",
        uri,
        output="out-delta",
        register="fm-pipe-a",
        search=False,
        weights=(0.3, 0.7),
        targets=["a"],
        promote={"metric": "a/accuracy", "min_delta": 1.0},
        baselines=[],
    )
    by_guard = write_config(
        ws,
        "p-guard.yaml",
        uri,
        output="out-guard",
        register="fm-pipe-a",
        search=False,
        weights=(0.7, 0.3),
        targets=["a"],
        promote={"metric": "a/accuracy", "min_delta": -1.0, "guard": {"a/f1": 1.5}},
        baselines=[],
    )
    return {"metric": run_pipeline(str(by_metric)), "guard": run_pipeline(str(by_guard))}


def test_worse_run_and_broken_guard_are_rejected(first, rejected) -> None:
    mlflow.set_tracking_uri(first["uri"])
    d_metric = rejected["metric"]["decisions"]["fm-pipe-a"]
    d_guard = rejected["guard"]["decisions"]["fm-pipe-a"]
    assert (d_metric["version"], d_metric["decision"]) == ("2", "rejected")
    assert (d_guard["version"], d_guard["decision"]) == ("3", "rejected")
    rows = {r["version"]: r for r in registry.history("fm-pipe-a")}
    assert sorted(rows) == ["1", "2", "3"]
    assert rows["1"]["aliases"] == ["champion"]
    assert rows["2"]["aliases"] == [] and rows["3"]["aliases"] == ["challenger"]
    assert rows["2"]["decision"] == "rejected" and rows["3"]["decision"] == "rejected"
    assert "a/accuracy" in rows["2"]["reason"] and "min_delta 1" in rows["2"]["reason"]
    assert "guard a/f1 broken" in rows["3"]["reason"] and "tolerance +1.5" in rows["3"]["reason"]
    for v in ("2", "3"):
        assert rows[v]["tags"]["fishmerge.champion_before"] == "1"
        assert (
            rows[v]["metrics"]["a/accuracy"]
            == rejected["metric" if v == "2" else "guard"]["results"]["merged"]["a/accuracy"]
        )
    assert versions(first["uri"], "fm-pipe-b") == ["1"]  # the single-target runs touch only a


# --- 4. MLflow unreachable or stopped -------------------------------------------------------------


def expect_clear_failure(args: list[str], capsys, uri: str) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fishmerge: error:")]
    assert len(errors) == 1, err
    assert "MLflow" in errors[0] and uri in errors[0] and "unreachable" in errors[0]
    assert "Traceback" not in err
    return errors[0]


def test_unreachable_tracking_server_fails_before_any_work(ws, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # as in a fresh `fishmerge run` process
    uri = f"http://127.0.0.1:{free_ports(1)[0]}"
    cfg = write_config(ws, "p-down.yaml", uri, output="out-down", register="fm-down")
    expect_clear_failure(["run", str(cfg), "--no-progress"], capsys, uri)
    assert not (ws / "out-down").exists()
    assert not list(ws.glob(".out-down*"))  # no staging folder either


def test_config_tracking_uri_is_honoured_after_an_earlier_run_in_this_process(ws, first, capsys) -> None:
    assert main(["history", "fm-pipe-a", "--tracking-uri", first["uri"]]) == 0  # earlier MLflow use here
    uri = f"http://127.0.0.1:{free_ports(1)[0]}"
    cfg = write_config(
        ws, "p-leak.yaml", uri, output="out-leak", register="fm-leak", search=False, targets=["a"], baselines=[]
    )
    try:
        expect_clear_failure(["run", str(cfg), "--no-progress"], capsys, uri)
    finally:
        assert "fm-leak" not in {m.name for m in MlflowClient(first["uri"]).search_registered_models()}
    assert not (ws / "out-leak").exists()


def test_stopped_mlflow_server_leaves_only_complete_versions(ws, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # as in a fresh `fishmerge run` process
    port = free_ports(1)[0]
    uri = f"http://127.0.0.1:{port}"
    db, artifacts = tmp_path / "server.db", tmp_path / "server-artifacts"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    cmd += ["--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts)]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        ok = write_config(
            ws,
            "p-server.yaml",
            uri,
            output="out-server",
            register="fm-server",
            search=False,
            targets=["a"],
            baselines=[],
        )
        out = run_pipeline(str(ok))
        assert out["decisions"]["fm-server"]["decision"] == "promoted"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()

    changed = write_config(
        ws,
        "p-server2.yaml",
        uri,
        output="out-server2",
        register="fm-server",
        search=False,
        weights=(0.2, 0.8),
        targets=["a"],
        baselines=[],
    )
    expect_clear_failure(["run", str(changed), "--no-progress"], capsys, uri)
    assert not (ws / "out-server2").exists()

    client = MlflowClient(f"sqlite:///{db}")
    found = client.search_model_versions("name = 'fm-server'")
    assert [str(v.version) for v in found] == ["1"]
    for v in found:
        # the version's model lives under the server's artifact destination: complete, with weights
        model_id = v.model_id or v.source.removeprefix("models:/")  # MLflow 3: source models:/<logged model id>
        location = client.get_logged_model(model_id).artifact_location
        assert location.startswith("mlflow-artifacts:/"), location
        folder = artifacts / location.removeprefix("mlflow-artifacts:/").lstrip("/")
        assert (folder / "MLmodel").exists(), folder
        weights = list(folder.rglob("model.safetensors"))
        assert len(weights) == 1 and weights[0].stat().st_size > 0
        assert (weights[0].parent / "config.json").exists()


# --- 5. fishmerge promote / history ----------------------------------------------------------------


def test_cli_promote_and_history(first, rejected, capsys) -> None:
    uri = first["uri"]
    capsys.readouterr()
    assert main(["promote", "fm-pipe-a", "--version", "2", "--tracking-uri", uri]) == 0
    assert "fm-pipe-a: version 2 is champion" in capsys.readouterr().out
    assert aliases(uri, "fm-pipe-a") == {"champion": "2", "challenger": "3"}
    assert MlflowClient(uri).get_model_version("fm-pipe-a", "2").tags["fishmerge.decision"] == "promoted_by_hand"

    assert main(["history", "fm-pipe-a", "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["version", "aliases"]
    body = [line.split() for line in lines[1:]]
    assert [row[:2] for row in body] == [["3", "challenger"], ["2", "champion"], ["1", "-"]]
    assert body[1][2] == "promoted_by_hand" and body[0][2] == "rejected" and body[2][2] == "promoted"

    assert main(["promote", "fm-pipe-a", "--tracking-uri", uri]) == 0  # default: the challenger
    assert aliases(uri, "fm-pipe-a") == {"champion": "3", "challenger": "3"}


def test_lengths_beyond_the_position_table_are_clamped_with_a_notice(ws, capsys) -> None:
    """Issue 11 item 13: texts longer than the model's 40 positions and the default max_length (128)
    ran into 'The size of tensor a (128) must match … (40)'; now every step clamps, with one notice each."""
    import datasets

    for name, keyword in KEYWORDS.items():
        rows = [{**r, "text": " ".join([r["text"]] * 15)} for r in keyword_rows(48, keyword, seed=30)]
        assert min(len(r["text"].split()) for r in rows) > 40
        ds = datasets.Dataset.from_list
        datasets.DatasetDict(
            {"train": ds(rows[:24]), "validation": ds(rows[24:36]), "test": ds(rows[36:])}
        ).save_to_disk(str(ws / f"long-{name}"))
    cfg = json.loads(write_config(ws, "long.yaml", f"sqlite:///{ws / 'mlflow-long.db'}", output="out-long").read_text())
    cfg["fisher"].pop("max_length")
    cfg["evaluate"].pop("max_length")
    cfg["evaluate"]["baselines"] = ["originals"]
    cfg["register"]["name"] = "fm-long"
    for m in cfg["models"]:
        m["data"]["path"] = f"long-{m['name']}"
    (ws / "long.yaml").write_text(json.dumps(cfg))
    capsys.readouterr()
    code = main(["run", str(ws / "long.yaml"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith("fishmerge: note: max_length 128")]
    assert any("Fisher" in ln for ln in notes) and any("λ search" in ln for ln in notes), err
    assert all("40 positions" in ln for ln in notes)
