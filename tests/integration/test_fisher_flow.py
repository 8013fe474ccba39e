"""The estimate-fisher flow as other flows call it (a subflow, not through `fishmerge fisher`): bounded
shard concurrency, capped torch threads, tasks that raise (bad input is not retried), a reduce that
tells corrupt partials from bugs, and the report rendered by the core."""

from __future__ import annotations

import base64
import os
import re
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import zarr
from fishmerge.fisher import job
from fishmerge.fisher.reduce import CorruptPartials
from fishmerge.fisher.shards import complete_shards, plan_shards
from fishmerge.flows.estimate_fisher import estimate_fisher

from tests.conftest import save_model_dir, sentences, write_csv


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flow")
    data = write_csv(root / "rows.csv", sentences(12, seed=3))
    return {
        "model": save_model_dir(root / "model", "bert-cls"),
        "lm": save_model_dir(root / "lm", "llama-lm"),
        "data": data,
    }


def spec(inputs: dict, **over) -> dict:
    base = job.FisherSpec(
        model=str(inputs["model"]), data=str(inputs["data"]), examples=12, batch_size=4, max_length=16
    )
    return {**asdict(base), **over}


class ShardProbe:
    """Wraps fishmerge.fisher.job.compute_shard (the real one runs): records how many shards compute at
    once and torch's thread count inside them; `fail` raises instead of the first `fail_times` calls."""

    def __init__(self, monkeypatch, fail: BaseException | None = None, fail_times: int = 0):
        self.real, self.lock = job.compute_shard, threading.Lock()
        self.calls, self.running, self.peak, self.threads = 0, 0, 0, set()
        self.fail, self.fail_times = fail, fail_times
        monkeypatch.setattr(job, "compute_shard", self)
        from fishmerge.tasks import fisher as tasks

        if hasattr(tasks, "compute_shard"):  # tasks that imported it by name
            monkeypatch.setattr(tasks, "compute_shard", self)

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.calls += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            failing = self.fail is not None and self.calls <= self.fail_times
        try:
            self.threads.add(torch.get_num_threads())
            time.sleep(0.3)  # long enough for shards started together to overlap
            if failing:
                raise self.fail
            return self.real(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def test_subflow_computes_one_shard_at_a_time_with_capped_threads(inputs, tmp_path, monkeypatch) -> None:
    probe = ShardProbe(monkeypatch)
    before = torch.get_num_threads()
    uri = estimate_fisher(spec=spec(inputs), store_root=str(tmp_path), shards=3)  # as flows/merge.py calls it
    assert probe.calls == 3 and probe.peak == 1, "the shards of a subflow ran at once"
    assert probe.threads == {max(1, os.cpu_count() or 1)}
    assert torch.get_num_threads() == before, "the cap is lifted when the flow ends"
    assert zarr.open_group(uri, mode="r").attrs["shards"] == 3


def test_workers_bound_concurrency_and_share_the_cpus(inputs, tmp_path, monkeypatch) -> None:
    probe = ShardProbe(monkeypatch)
    uri = estimate_fisher(spec=spec(inputs), store_root=str(tmp_path), shards=3, workers=2)
    assert probe.calls == 3 and probe.peak <= 2
    assert probe.threads == {max(1, (os.cpu_count() or 1) // 2)}
    assert sorted(zarr.open_group(uri, mode="r").attrs["shards_computed_last_run"]) == [0, 1, 2]


def test_bad_input_in_a_shard_fails_the_flow_once_without_retries(inputs, tmp_path, monkeypatch, capsys) -> None:
    from safetensors.torch import load_file, save_file

    probe = ShardProbe(monkeypatch)
    d = save_model_dir(tmp_path / "nan", "bert-cls")  # NaN logits: found only while the shard computes
    weights = load_file(d / "model.safetensors")
    weights["classifier.weight"][1, :] = float("nan")
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    state = estimate_fisher(spec=spec(inputs, model=str(d)), store_root=str(tmp_path / "s"), return_state=True)
    assert state.is_failed()
    assert "NaN/Inf logits" in state.message and "\n" not in state.message
    assert probe.calls == 1, "bad input was retried"
    assert "Traceback" not in capsys.readouterr().err


def test_other_shard_errors_are_retried(inputs, tmp_path, monkeypatch) -> None:
    probe = ShardProbe(monkeypatch, fail=RuntimeError("flaky device"), fail_times=1)
    uri = estimate_fisher(spec=spec(inputs), store_root=str(tmp_path))
    assert probe.calls == 2
    assert zarr.open_group(uri, mode="r").attrs["n_examples"] == 12


def test_exact_on_an_lm_is_refused_before_any_shard(inputs, tmp_path, monkeypatch, capsys) -> None:
    probe = ShardProbe(monkeypatch)
    bad = spec(inputs, model=str(inputs["lm"]), estimator="exact")  # exact over a vocabulary: refused
    state = estimate_fisher(spec=bad, store_root=str(tmp_path), return_state=True)
    assert state.is_failed() and "--estimator sampled" in state.message and "\n" not in state.message
    assert probe.calls == 0, "the model was loaded for a spec refused by its config alone"
    assert "Traceback" not in capsys.readouterr().err


def test_bad_input_before_any_shard_is_one_failed_state(inputs, tmp_path, capsys) -> None:
    state = estimate_fisher(
        spec=spec(inputs, model=str(tmp_path / "nope")), store_root=str(tmp_path), return_state=True
    )
    assert state.is_failed() and "does not exist" in state.message and "\n" not in state.message
    assert "Traceback" not in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing is written"


def _computed(inputs: dict, tmp_path, k: int):
    r = job.resolve(job.FisherSpec(**spec(inputs)), store_root=str(tmp_path))
    plan = plan_shards(len(r.indices), k)
    summaries = [job.compute_shard(r, s) for s in plan]
    return r, plan, summaries


def test_a_bug_in_the_reduce_propagates_and_keeps_the_partials(inputs, tmp_path, monkeypatch) -> None:
    r, plan, summaries = _computed(inputs, tmp_path, 2)

    def bug(self, selection):
        raise RuntimeError("a bug, not a corrupt partial")

    monkeypatch.setattr(zarr.Array, "__getitem__", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        job.finish(r, plan, summaries, 1.0)
    monkeypatch.undo()
    assert sorted(complete_shards(r.partials, r.fisher_id, plan)) == [0, 1], "good partials were discarded"
    assert job.existing_store(r) is None


def test_a_bug_in_the_reduce_is_not_recomputed_by_the_flow(inputs, tmp_path, monkeypatch) -> None:
    probe = ShardProbe(monkeypatch)
    real = zarr.Array.__getitem__

    def bug(self, selection):
        if "shard-" in str(self.store_path):  # reading partials: the reduce
            raise RuntimeError("a bug, not a corrupt partial")
        return real(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", bug)
    state = estimate_fisher(spec=spec(inputs), store_root=str(tmp_path), shards=2, return_state=True)
    assert state.is_failed()
    assert probe.calls == 2, "shards were recomputed for a bug"


def test_corrupt_partials_are_reported_and_discarded(inputs, tmp_path) -> None:
    r, plan, summaries = _computed(inputs, tmp_path, 2)
    chunk = sorted(p for p in (tmp_path / f"{r.fisher_id}.zarr.partials" / "shard-00001").rglob("c/*") if p.is_file())[
        0
    ]
    chunk.write_bytes(chunk.read_bytes()[:5])
    with pytest.raises(CorruptPartials) as info:
        job.finish(r, plan, summaries, 1.0)
    assert info.value.shards == [1]
    assert sorted(complete_shards(r.partials, r.fisher_id, plan)) == [0]


def test_corrupt_partials_survive_pickling() -> None:
    import pickle

    exc = pickle.loads(pickle.dumps(CorruptPartials([2, 5])))  # a Dask worker's reduce raises it to the flow
    assert exc.shards == [2, 5] and "[2, 5]" in str(exc)


def test_report_markdown_comes_from_the_core(inputs, tmp_path) -> None:
    from fishmerge.fisher.report import fisher_report_markdown

    r, plan, summaries = _computed(inputs, tmp_path, 2)
    uri = job.finish(r, plan, summaries, 2.0)
    md, png = fisher_report_markdown(uri, summaries)
    assert md.startswith(f"# Fisher {r.fisher_id}\n")
    assert "## Shards computed this run" in md and "## Per-layer Fisher mass" in md
    assert "| 0 | 6 |" in md and "| 1 | 6 |" in md
    assert png == uri.removesuffix(".zarr") + ".layer-mass.png" and os.path.getsize(png) > 1000
    inline = re.search(r"!\[Fisher mass per layer\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert inline and base64.b64decode(inline.group(1)) == Path(png).read_bytes()  # the UI shows the plot


def test_no_load_counter_in_production_code() -> None:
    """Tests count model loads by wrapping the loader (tests/test_fisher_sharded.py count_loads)."""
    from fishmerge.io import checkpoint

    assert not hasattr(checkpoint, "LOAD_COUNT")


def test_token_head_with_one_label_per_example_is_a_clear_error(inputs, tmp_path, capsys) -> None:
    from fishmerge.flows.cli import main

    model = save_model_dir(tmp_path / "tok", "bert-tok")
    args = ["fisher", "--no-progress", "--model", str(model), "--data", str(inputs["data"]), "--estimator", "sampled"]
    args += ["--examples", "4", "--max-length", "16"]
    assert main([*args, "--store", str(tmp_path / "a.zarr")]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fishmerge: error:")]
    assert len(lines) == 1 and "one per token" in lines[0] and "Traceback" not in err
    assert main([*args, "--label-field", "", "--store", str(tmp_path / "b.zarr")]) == 0
    assert zarr.open_group(str(tmp_path / "b.zarr"), mode="r").attrs["head"] == "token_classification"


def test_a_bug_is_an_internal_error_not_bad_input(inputs, tmp_path, monkeypatch, capsys) -> None:
    """`fishmerge fisher` tells a bug (exit 1, "internal error") from bad input (exit 2)."""
    from fishmerge.flows.cli import main

    ShardProbe(monkeypatch, fail=RuntimeError("a bug in a shard"), fail_times=99)
    args = ["fisher", "--no-progress", "--model", str(inputs["model"]), "--data", str(inputs["data"])]
    assert main([*args, "--examples", "4", "--store", str(tmp_path / "s.zarr")]) == 1
    err = capsys.readouterr().err
    assert "fishmerge: internal error: RuntimeError: a bug in a shard" in err
    assert not (tmp_path / "s.zarr").exists()
