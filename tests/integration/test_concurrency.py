"""Two `fishmerge` processes started at the same moment on the same outputs.

- two `fishmerge fisher` of one spec (same --store-root, --shards 3): both exit 0 and print the
  same store URI; the store equals a clean run's (arrays exactly, fisher_id / n_examples /
  estimator); nothing left over;
- two `fishmerge merge` of one config to one output: both exit 0; the output is byte-identical to
  a clean run's (fishmerge.json without `created`, README.md with it masked); nothing left over;
- two merges of different configs (other weights) to one output, without --overwrite: exactly one
  exits 0; the other exits 2 with exactly one stderr line, `fishmerge: error: …` naming the output
  and saying it exists or is being written, and no traceback; the output is the winner's clean
  output; nothing left over;
- the same two configs, both with --overwrite: both exit 0; the output equals one of the two
  clean outputs exactly; nothing left over.

Both processes are forked together from the killpoint fork server (no kill point: plain runs) and
meet at their first critical step (see MERGE_MEET, FISHER_MEET); each case is repeated
FISHMERGE_FAULT_REPEATS times (default 3) in a fresh workspace.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.integration.faults import (
    assert_no_leftovers,
    assert_store_equal,
    diff_keys,
    fisher_inputs,
    fishmerge,
    folder_bytes,
    fresh_dir,
    merge_config,
    merge_inputs,
    store_content,
    together,
)

REPEATS = range(int(os.environ.get("FISHMERGE_FAULT_REPEATS", "3")))
WEIGHTS = {"cfg-a.yaml": (0.6, 0.4), "cfg-b.yaml": (0.25, 0.75)}
MERGE = ["merge", "--no-progress"]


# Where the two processes meet (each waits for the other there): merges at their first file-system
# step (staging), Fisher runs at their first shard. They start together anyway (forked back to back),
# but Prefect's test server answers concurrent flow-run creations with 503 and the client backs off
# about 2 s: without a meeting point the two runs barely overlap.
MERGE_MEET = [{"name": "*"}]
FISHER_MEET = [{"name": "*", "arg": "attempt-*"}]


def run_together(points: list[dict], *jobs: tuple[list, Path]):
    """Start the commands at the same moment, make them meet at `points`, wait for all; their results."""
    return together([{"args": args, "cwd": cwd} for args, cwd in jobs], points)


@pytest.fixture(scope="module")
def fisher_clean(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("concurrent-fisher")
    args = fisher_inputs(root / "inputs")
    clean = fresh_dir(root / "clean")
    done = fishmerge(args, cwd=clean)
    assert done.returncode == 0, done.tail()
    return {"root": root, "args": args, "name": Path(done.last_line).name, "reference": store_content(done.last_line)}


@pytest.mark.parametrize("rep", REPEATS)
def test_two_fisher_runs_of_one_spec(fisher_clean, rep) -> None:
    ws = fresh_dir(fisher_clean["root"] / f"rep-{rep}")
    results = run_together(FISHER_MEET, (fisher_clean["args"], ws), (fisher_clean["args"], ws))
    assert [r.returncode for r in results] == [0, 0], "\n\n".join(r.tail() for r in results)
    uris = {r.last_line for r in results}
    assert uris == {str(ws / "fishers" / fisher_clean["name"])}, uris
    assert_store_equal(uris.pop(), fisher_clean["reference"], "two concurrent runs")
    assert_no_leftovers(ws)
    shutil.rmtree(ws)


@pytest.fixture(scope="module")
def merge_clean(tmp_path_factory) -> dict:
    """The inputs, and the clean output of each config merged alone."""
    root = tmp_path_factory.mktemp("concurrent-merge")
    inputs = merge_inputs(root / "inputs")
    outputs = {}
    for file, weights in WEIGHTS.items():
        clean = fresh_dir(root / f"clean-{file}")
        merge_config(inputs, clean, weights, file)
        done = fishmerge([*MERGE, file], cwd=clean)
        assert done.returncode == 0, done.tail()
        outputs[file] = folder_bytes(clean / "out")
    assert outputs["cfg-a.yaml"] != outputs["cfg-b.yaml"]
    return {"root": root, "inputs": inputs, "outputs": outputs}


def merge_workspace(case: dict, name: str) -> Path:
    ws = fresh_dir(case["root"] / name)
    for file, weights in WEIGHTS.items():
        merge_config(case["inputs"], ws, weights, file)  # both write to ws/out
    return ws


@pytest.mark.parametrize("rep", REPEATS)
def test_two_merges_of_one_config(merge_clean, rep) -> None:
    ws = merge_workspace(merge_clean, f"same-{rep}")
    results = run_together(MERGE_MEET, ([*MERGE, "cfg-a.yaml"], ws), ([*MERGE, "cfg-a.yaml"], ws))
    assert [r.returncode for r in results] == [0, 0], "\n\n".join(r.tail() for r in results)
    assert all(r.last_line == str(ws / "out") for r in results)
    assert not diff_keys(folder_bytes(ws / "out"), merge_clean["outputs"]["cfg-a.yaml"]), (
        "files differ from a clean run"
    )
    assert_no_leftovers(ws)
    shutil.rmtree(ws)


@pytest.mark.parametrize("rep", REPEATS)
def test_two_merges_of_different_configs_without_overwrite(merge_clean, rep) -> None:
    ws = merge_workspace(merge_clean, f"different-{rep}")
    files = list(WEIGHTS)
    results = run_together(MERGE_MEET, *(([*MERGE, f], ws) for f in files))
    codes = [r.returncode for r in results]
    everything = "\n\n".join(r.tail() for r in results)
    assert sorted(codes) == [0, 2], everything
    winner = files[codes.index(0)]
    loser = results[codes.index(2)]
    assert "Traceback" not in loser.stderr, everything
    errors = [line for line in loser.stderr.splitlines() if line.startswith("fishmerge: error:")]
    assert len(errors) == 1, everything
    # It names the output and says it exists / is being written (wording varies: "already holds another
    # merge", "was written by another fishmerge run", …) or how to replace it.
    line = errors[0]
    assert str(ws / "out") in line and any(w in line for w in ("exist", "being written", "--overwrite")), line
    assert not diff_keys(folder_bytes(ws / "out"), merge_clean["outputs"][winner]), f"not {winner}'s clean output"
    assert_no_leftovers(ws)
    shutil.rmtree(ws)


@pytest.mark.parametrize("rep", REPEATS)
def test_two_merges_of_different_configs_with_overwrite(merge_clean, rep) -> None:
    ws = merge_workspace(merge_clean, f"overwrite-{rep}")
    results = run_together(MERGE_MEET, *(([*MERGE, f, "--overwrite"], ws) for f in WEIGHTS))
    assert [r.returncode for r in results] == [0, 0], "\n\n".join(r.tail() for r in results)
    got = folder_bytes(ws / "out")
    matches = [f for f, out in merge_clean["outputs"].items() if not diff_keys(got, out)]
    differ = {f: diff_keys(got, out) for f, out in merge_clean["outputs"].items()}
    assert len(matches) == 1, f"the output is neither config's clean output; files that differ: {differ}"
    assert_no_leftovers(ws)
    shutil.rmtree(ws)
