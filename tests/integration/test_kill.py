"""Randomized SIGKILL tests: `fishmerge fisher`, `fishmerge merge` and `fishmerge run`, each killed at
drawn kill points (like an OOM kill or a lost node), then rerun to completion.

For each command a clean, uninterrupted run is traced first (tests/integration/killpoint.py counts
its commit-ish calls: renames, fsyncs, pwrites, mkdirs, removals, MLflow state changes). Kill
points are drawn with `random.Random(seed)` (fixed seeds) from [1, total]: half uniformly, half
focused — for `fisher` and `merge` every kind of call equally likely (so the rare commits, store
renames and partials removal, are hit as often as chunk writes), for `run` among the MLflow calls
(registration, version tags, aliases, promotion) — each with a side, just before or just after
the call. At each point the command runs in a fresh process that SIGKILLs itself there, in a
workspace of its own; then the same command is rerun to completion there and the test asserts:

- the result equals the clean run's: `fisher … --shards 3` — the store's arrays (read with zarr)
  exactly, and its fisher_id, n_examples and estimator; `merge` — every file of the output folder
  byte for byte (fishmerge.json without its `created` timestamp, README.md with it masked);
  `run` — the merged weights byte for byte, and the MLflow registry (SQLite under the workspace)
  in the clean run's state: as many versions per registered model, the same `champion` and
  `challenger` aliases, and every version tagged `fishmerge.decision`;
- nothing is left over anywhere in the workspace (`.*.tmp-*`, `*.partials`, `.*.staging-*`,
  `.*.old-*`, `*.lock`, `.fishmerge-probe-*`, …: see faults.LEFTOVER_PATTERNS); the pipeline's
  `.fishmerge/` caches and MLflow's folders are not checked.

CI runs 10 kill points per command. Raise it by hand with the environment variable
FISHMERGE_FAULT_KILLS, e.g. `FISHMERGE_FAULT_KILLS=50 pytest tests/integration/test_kill.py`
(more points, drawn from the same seeds: the first 10 stay the same).

Each process is forked from a fork server that imported fishmerge once (killpoint.serve): the
same wrappers and `flows.cli.main` as `python -m tests.integration.killpoint`, without paying 4 s of
imports per process; two points run at once (each kill → rerun chain in its own workspace; the
count, not timing, picks the kill, so this changes nothing). `test_launcher_cli` runs the launcher
itself as a plain subprocess. A clean run must leave no leftover either.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import save_model_dir
from tests.integration.faults import (
    KILLS,
    Result,
    Trace,
    assert_no_leftovers,
    assert_store_equal,
    by_kind,
    diff_keys,
    draw_points,
    fisher_inputs,
    fishmerge,
    fishmerge_chains,
    folder_bytes,
    fresh_dir,
    killpoint_cli,
    leftovers,
    merge_config,
    merge_inputs,
    mlflow_calls,
    store_content,
    weights_bytes,
)

# Fixed seeds. On today's traces they draw, among others: fisher — a kill before the store root's
# write probe is removed, kills during the reduce and just after the store's rename (before its
# partials are removed); merge — after the fsyncs, after the output's rename (while its staging
# folder is removed); run — kills in both Fisher estimations, between a version's creation and its
# tags, between the champion alias and the decision tag.
SEEDS = {"fisher": 118, "merge": 202, "run": 624}
POINTS = range(KILLS)


def _kill_then_rerun(case: dict, i: int) -> tuple[Path, str, Result]:
    """Kill the command at its i-th drawn point in workspace point-i, then rerun it there to completion;
    (the workspace, the kill point described, the rerun's result). Points are run two at a time (two
    chains kill → rerun at once, in their own workspaces: the machine has 2 cores, each run uses one)."""
    done = case.setdefault("done", {})
    if i not in done:
        pair = [j for j in (i - i % 2, i - i % 2 + 1) if j < len(case["points"])]
        chains = []
        for j in pair:
            ws = fresh_dir(case["root"] / f"point-{j}")
            case["prepare"](ws)
            n, side = case["points"][j]
            chains.append([{"args": case["args"], "cwd": ws, "at": n, "side": side}, {"args": case["args"], "cwd": ws}])
        for j, results in zip(pair, fishmerge_chains(chains)):
            done[j] = results
    killed, again = done.pop(i)
    ws = case["root"] / f"point-{i}"
    n, side = case["points"][i]
    what = case["trace"].describe(n, side)
    assert killed.returncode in (-9, 0) and not killed.timed_out, f"killed at {what}: {killed.tail()}"
    if killed.returncode == 0:
        assert n > case["trace"].total - 5, f"finished although killed at {what}"
    assert again.returncode == 0, f"rerun after a kill at {what}: {again.tail()}"
    return ws, what, again


# ---------------------------------------------------------------- fishmerge fisher --shards 3


@pytest.fixture(scope="module")
def fisher_case(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kill-fisher")
    args = fisher_inputs(root / "inputs")
    clean = fresh_dir(root / "clean")
    done = fishmerge(args, cwd=clean, trace=root / "trace.json")
    assert done.returncode == 0, done.tail()
    trace = Trace.load(root / "trace.json")
    uri = done.last_line
    assert Path(uri).parent == clean / "fishers"
    assert not leftovers(clean), "a clean run left these"
    return {
        "root": root,
        "args": args,
        "trace": trace,
        "points": draw_points(trace, SEEDS["fisher"], KILLS, by_kind),
        "prepare": lambda ws: None,
        "store_name": Path(uri).name,
        "reference": store_content(uri),
    }


@pytest.mark.parametrize("i", POINTS)
def test_fisher_killed_then_rerun_equals_clean(fisher_case, i) -> None:
    ws, what, again = _kill_then_rerun(fisher_case, i)
    uri = again.last_line
    assert uri == str(ws / "fishers" / fisher_case["store_name"]), f"after a kill at {what}: {uri}"
    assert_store_equal(uri, fisher_case["reference"], f"after a kill at {what}")
    assert_no_leftovers(ws, f"a kill at {what} and a rerun")
    shutil.rmtree(ws)


# ---------------------------------------------------------------- fishmerge merge CONFIG


@pytest.fixture(scope="module")
def merge_case(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kill-merge")
    inputs = merge_inputs(root / "inputs")
    clean = fresh_dir(root / "clean")
    args = ["merge", "cfg.yaml", "--no-progress"]
    merge_config(inputs, clean)
    done = fishmerge(args, cwd=clean, trace=root / "trace.json")
    assert done.returncode == 0, done.tail()
    assert not leftovers(clean), "a clean run left these"
    trace = Trace.load(root / "trace.json")
    return {
        "root": root,
        "inputs": inputs,
        "args": args,
        "trace": trace,
        "points": draw_points(trace, SEEDS["merge"], KILLS, by_kind),
        "prepare": lambda ws: merge_config(inputs, ws),
        "reference": folder_bytes(clean / "out"),
    }


@pytest.mark.parametrize("i", POINTS)
def test_merge_killed_then_rerun_equals_clean(merge_case, i) -> None:
    ws, what, again = _kill_then_rerun(merge_case, i)
    assert again.last_line == str(ws / "out"), f"after a kill at {what}: {again.tail()}"
    got = folder_bytes(ws / "out")
    assert not diff_keys(got, merge_case["reference"]), f"after a kill at {what}, these files differ from a clean run"
    assert_no_leftovers(ws, f"a kill at {what} and a rerun")
    shutil.rmtree(ws)


def test_launcher_cli(merge_case) -> None:
    """`python -m tests.integration.killpoint` itself: --trace counts as the fork server's children do
    (a few calls of difference allowed: threads), and --at SIGKILLs."""
    ws = fresh_dir(merge_case["root"] / "cli")
    merge_config(merge_case["inputs"], ws)
    traced = killpoint_cli(merge_case["args"], ws, "--trace", str(ws.parent / "cli-trace.json"))
    assert traced.returncode == 0, traced.tail()
    assert traced.last_line == str(ws / "out")
    total = Trace.load(ws.parent / "cli-trace.json").total
    assert abs(total - merge_case["trace"].total) <= max(3, total // 50), (total, merge_case["trace"].total)
    shutil.rmtree(ws / "out")
    killed = killpoint_cli(merge_case["args"], ws, "--at", str(total // 2))  # the side by parity
    assert killed.returncode == -9, killed.tail()
    shutil.rmtree(ws)


# ---------------------------------------------------------------- fishmerge run CONFIG (the pipeline)


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> dict:
    """Two tiny BERTs fine-tuned from one body on keyword tasks (tests/test_pipeline.py, smaller), their
    datasets, and an empty, migrated MLflow SQLite database to copy into each workspace."""
    import datasets
    import torch
    from fishmerge.io.checkpoint import cached_model_fingerprint
    from mlflow import MlflowClient

    from tests.integration.test_pipeline import KEYWORDS, finetune, keyword_rows

    root = tmp_path_factory.mktemp("kill-run-inputs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, (name, keyword) in enumerate(KEYWORDS.items()):
            rows = keyword_rows(36, keyword, seed=10 + i)
            d = save_model_dir(root / name, "bert-cls2", seed=0)
            finetune(d, rows[:12], seed=i + 1, steps=10)
            cached_model_fingerprint(d)
            ds = datasets.Dataset.from_list
            splits = {"train": ds(rows[:12]), "validation": ds(rows[12:24]), "test": ds(rows[24:])}
            datasets.DatasetDict(splits).save_to_disk(str(root / f"data-{name}"))
    finally:
        torch.set_num_threads(threads)
    db = root / "template" / "mlflow.db"
    db.parent.mkdir()
    MlflowClient(f"sqlite:///{db}").search_experiments()  # creates the schema (seconds): once, not per point
    return {"root": root, "db": db}


def run_workspace(inputs: dict, ws: Path) -> Path:
    """`ws` with p.yaml (tests/test_pipeline.py's config at small sizes, inputs by absolute path) and
    a fresh copy of the empty MLflow database at ws/mlflow/mlflow.db."""
    from tests.integration.test_pipeline import write_config

    fresh_dir(ws)
    (ws / "mlflow").mkdir()
    shutil.copy(inputs["db"], ws / "mlflow" / "mlflow.db")
    cfg = write_config(ws, "p.yaml", f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}", baselines=[], fisher={"examples": 12})
    data = json.loads(cfg.read_text())
    for m in data["models"]:
        m["path"] = str(inputs["root"] / m["name"])
        m["data"]["path"] = str(inputs["root"] / f"data-{m['name']}")
    cfg.write_text(json.dumps(data))
    return ws


def registry_state(ws: Path) -> dict:
    """{registered model: {"versions": n, "aliases": {alias: version}, "undecided": [versions without a decision]}}."""
    from fishmerge.registry import DECISION_TAG
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    state = {}
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{rm.name}'")
        state[rm.name] = {
            "versions": len(versions),
            "aliases": {a: str(v) for a, v in client.get_registered_model(rm.name).aliases.items()},
            "undecided": sorted(str(v.version) for v in versions if DECISION_TAG not in v.tags),
        }
    # no MLflow run left RUNNING by a killed attempt (the rerun closes it as KILLED)
    running = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'"
    )
    state["runs left RUNNING"] = len(running)
    return state


@pytest.fixture(scope="module")
def run_case(tmp_path_factory, run_inputs) -> dict:
    root = tmp_path_factory.mktemp("kill-run")
    clean = run_workspace(run_inputs, root / "clean")
    args = ["run", "p.yaml", "--no-progress"]
    done = fishmerge(args, cwd=clean, trace=root / "trace.json")
    assert done.returncode == 0, done.tail()
    assert not leftovers(clean), "a clean run left these"
    trace = Trace.load(root / "trace.json")
    registry = registry_state(clean)
    models = {k: v for k, v in registry.items() if k != "runs left RUNNING"}
    assert registry["runs left RUNNING"] == 0, registry
    assert len(models) == 2 and all(r["versions"] == 1 for r in models.values()), registry
    assert all(set(r["aliases"]) == {"champion", "challenger"} and not r["undecided"] for r in models.values())
    return {
        "root": root,
        "args": args,
        "trace": trace,
        "points": draw_points(trace, SEEDS["run"], KILLS, mlflow_calls),
        "prepare": lambda ws: run_workspace(run_inputs, ws),
        "weights": weights_bytes(clean / "out"),
        "registry": registry,
    }


@pytest.mark.parametrize("i", POINTS)
def test_run_killed_then_rerun_equals_clean(run_case, i) -> None:
    ws, what, _ = _kill_then_rerun(run_case, i)
    assert weights_bytes(ws / "out") == run_case["weights"], f"after a kill at {what}: merged weights differ"
    state = registry_state(ws)
    assert state == run_case["registry"], f"after a kill at {what}: registry {state} != clean {run_case['registry']}"
    assert_no_leftovers(ws, f"a kill at {what} and a rerun")
    shutil.rmtree(ws)
