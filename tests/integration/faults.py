"""Shared machinery of the kill and concurrency tests: running `fishmerge` in fresh processes
(through the killpoint fork server), drawing kill points from a trace, comparing outputs, and
walking a workspace for leftovers."""

from __future__ import annotations

import atexit
import fnmatch
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("FISHMERGE_FAULT_KILLS", "10"))  # kill points per command

# Names a finished or resumed command must not leave anywhere in its workspace.
LEFTOVER_PATTERNS = (
    ".*.tmp-*",  # a store or file staged aside (fisher_store.begin_store, storage.write_json)
    "*.tmp-*",
    "*.partials",  # shard partial sums of a Fisher store
    ".*.staging-*",  # a merge's staging folder
    ".*.old-*",  # an output moved aside to be replaced
    "*.lock",
    ".fishmerge-lock",  # a writer's liveness lock (inside its staging folder)
    ".fishmerge-probe-*",  # the store root's write probe
    ".fishmerge-write-check-*",  # the tracking database folder's write probe
    "*.partial",  # Zarr's own file staged aside
)
# Folders whose content is not checked: the pipeline's caches and MLflow's own files.
ALLOWED_DIRS = (".fishmerge", "mlflow", "mlruns", "mlartifacts")

# Child processes: one intra-op thread (tiny models; more threads only spin on 2 cores), offline.
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}


def leftovers(root: Path, allowed: tuple[str, ...] = ALLOWED_DIRS) -> list[str]:
    """Paths (relative to root) of entries whose name is a leftover pattern; symlinks not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames) + filenames:
            if any(fnmatch.fnmatch(name, p) for p in LEFTOVER_PATTERNS):
                found.append(str((here / name).relative_to(root)))
        dirnames[:] = [d for d in dirnames if d not in allowed]
    return sorted(found)


def assert_no_leftovers(ws: Path, after: str = "") -> None:
    """Nothing named like a fishmerge leftover anywhere in the workspace."""
    left = leftovers(ws)
    where = f"after {after}, " if after else ""
    assert not left, f"{where}left over in the workspace: {left}"


# ---------------------------------------------------------------- running fishmerge in fresh processes


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""

    def tail(self, n: int = 2500) -> str:
        late = " (timed out: SIGKILLed by the fork server)" if self.timed_out else ""
        return f"rc={self.returncode}{late}\n--- stdout\n{self.stdout[-500:]}\n--- stderr\n{self.stderr[-n:]}"


_server = None
_logs = None
_ids = itertools.count()


def _fork_server():
    """One fork server per pytest process (started on first use, after the Prefect harness set
    PREFECT_API_URL: Prefect reads its settings at import): imports paid once, each job a fresh fork."""
    global _server, _logs
    if _server is None:
        from tests.integration.killpoint import ForkServer

        _logs = Path(tempfile.mkdtemp(prefix="fishmerge-fault-logs-"))
        _server = ForkServer(cwd=str(REPO), env=CHILD_ENV)
        atexit.register(_close_server)
    return _server


def _logs_dir() -> Path:
    _fork_server()
    return _logs


def _close_server() -> None:
    if _server is not None:
        _server.close()
    if _logs is not None:
        shutil.rmtree(_logs, ignore_errors=True)


def fishmerge_chains(chains: list[list[dict]], timeout: float = 300) -> list[list[Result]]:
    """Run chains of jobs {args, cwd, at?, side?, trace?, env?}: the chains at the same time, the jobs of
    a chain one after the other, each `fishmerge args` in a fresh process forked from the fork server
    (killed at counted call `at`, before or after it, or traced into `trace`); their results."""
    server = _fork_server()
    full = []
    for chain in chains:
        full.append([])
        for job in chain:
            i = next(_ids)
            full[-1].append(
                {
                    "args": [str(a) for a in job["args"]],
                    "cwd": str(job["cwd"]),
                    "at": job.get("at"),
                    "side": job.get("side"),
                    "sync": job.get("sync"),
                    "timeout": timeout,
                    "trace": str(job["trace"]) if job.get("trace") else None,
                    "env": job.get("env") or {},
                    "stdout": str(_logs / f"{i}.out"),
                    "stderr": str(_logs / f"{i}.err"),
                }
            )
    answers = server.run(full)
    results = []
    for chain, statuses in zip(full, answers):
        results.append([])
        for job, status in zip(chain, statuses or []):
            out, err = Path(job["stdout"]), Path(job["stderr"])
            text = [f.read_text(errors="replace") if f.exists() else "" for f in (out, err)]
            results[-1].append(Result(status["returncode"], text[0], text[1], status["timed_out"]))
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)
        if len(results[-1]) != len(chain):
            raise RuntimeError("a chain runner of the fork server died")
    return results


def fishmerge_jobs(jobs: list[dict], timeout: float = 300) -> list[Result]:
    """Run the jobs at the same time (see fishmerge_chains); their results."""
    return [chain[0] for chain in fishmerge_chains([[job] for job in jobs], timeout)]


def together(jobs: list[dict], points: list[dict], timeout: float = 20) -> list[Result]:
    """Start the jobs at the same moment and make them meet before each sync point in turn
    (killpoint.install: {"name": fnmatch pattern, "arg": pattern} of a counted call), so that their
    critical steps overlap although Prefect's start-up does not (its test server answers concurrent
    flow-run creations with 503 and the client backs off ~2 s)."""
    folder = Path(tempfile.mkdtemp(prefix="fishmerge-sync-", dir=_logs_dir()))
    sync = {"dir": str(folder), "count": len(jobs), "points": points, "timeout": timeout}
    try:
        return fishmerge_jobs([{**job, "sync": sync} for job in jobs])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fishmerge(
    args: list, cwd: Path, at: int | None = None, side: str | None = None, trace: Path | None = None
) -> Result:
    return fishmerge_jobs([{"args": args, "cwd": cwd, "at": at, "side": side, "trace": trace}])[0]


def killpoint_cli(args: list, cwd: Path, *extra: str, timeout: float = 300) -> Result:
    """The launcher itself as a plain subprocess: python -m tests.integration.killpoint EXTRA -- ARGS."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.killpoint", *extra, "--", *[str(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **CHILD_ENV},
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------- kill points


@dataclass
class Trace:
    total: int
    calls: list[str]
    args: list[str]

    @classmethod
    def load(cls, path: Path) -> Trace:
        d = json.loads(Path(path).read_text())
        return cls(d["total"], d["calls"], d["args"])

    def describe(self, n: int, side: str) -> str:
        if 1 <= n <= len(self.calls):
            return f"call {n}/{self.total}, {side} {self.calls[n - 1]}({self.args[n - 1]!r}) in the clean trace"
        return f"call {n}/{self.total}, {side} it (past the end of the clean trace)"


def draw_points(trace: Trace, seed: int, n: int, focus: Callable[[Trace], list[list[int]]]) -> list[tuple[int, str]]:
    """n kill points (call number, "before" | "after"), by `random.Random(seed)`: half uniform in
    [1, total], half focused — `focus(trace)` gives strata of call numbers; the focused draws visit
    the strata in a random order (each once before any twice), a random call within each; no point
    twice. Fractions are drawn, not numbers, so a total that differs by a few calls from run to run
    moves the points only a little; and the first points stay the same when n is raised."""
    rng = random.Random(seed)
    strata = [s for s in focus(trace) if s] or [list(range(1, trace.total + 1))]
    order = list(range(len(strata)))
    rng.shuffle(order)
    points: list[tuple[int, str]] = []
    for i in range(n):
        for _ in range(20):  # a point drawn twice is drawn again
            side = "before" if rng.random() < 0.5 else "after"
            u = rng.random()
            if i % 2 == 0:
                point = (1 + int(u * trace.total), side)
            else:
                stratum = strata[order[(i // 2) % len(order)]]
                point = (stratum[int(u * len(stratum))], side)
            if point not in points:
                break
        points.append(point)
    return points


def by_kind(trace: Trace) -> list[list[int]]:
    """One stratum per kind of call (name): the rare commits (renames, removals, fsyncs) are drawn
    as often as the thousands of chunk writes."""
    kinds: dict[str, list[int]] = {}
    for i, name in enumerate(trace.calls, 1):
        kinds.setdefault(name, []).append(i)
    return [kinds[k] for k in sorted(kinds)]


def mlflow_calls(trace: Trace) -> list[list[int]]:
    """One stratum: the MLflow calls (run, params, artifacts, registration, version tags, aliases)."""
    return [[i for i, name in enumerate(trace.calls, 1) if name.startswith("mlflow.")]]


# ---------------------------------------------------------------- comparing results


def store_content(uri: str) -> tuple[dict[str, np.ndarray], dict]:
    """A Fisher store's arrays and attributes, read with zarr."""
    import zarr

    group = zarr.open_group(uri, mode="r")
    return {name: arr[...] for name, arr in group.arrays()}, dict(group.attrs)


def assert_store_equal(uri: str, reference: tuple[dict[str, np.ndarray], dict], where: str) -> None:
    arrays, attrs = store_content(uri)
    ref_arrays, ref_attrs = reference
    assert sorted(arrays) == sorted(ref_arrays), where
    for k, v in ref_arrays.items():
        assert arrays[k].dtype == v.dtype and np.array_equal(arrays[k], v), f"{where}: array {k} differs"
    for k in ("fisher_id", "n_examples", "estimator"):
        assert attrs.get(k) == ref_attrs.get(k), f"{where}: attribute {k}: {attrs.get(k)!r} != {ref_attrs.get(k)!r}"


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under a merge output folder, with the `created` timestamp dropped from fishmerge.json
    and from README.md (which embeds it): what must be byte-identical between two runs of one merge."""
    out = {}
    created = {}
    for p in sorted(folder.rglob("fishmerge.json")):
        record = json.loads(p.read_text())
        created[p.parent] = record.pop("created", None)
        out[p.relative_to(folder).as_posix()] = json.dumps(record, indent=2, sort_keys=True).encode()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel in out:
            continue
        data = p.read_bytes()
        if p.name == "README.md" and created.get(p.parent):
            data = data.replace(created[p.parent].encode(), b"<created>")
        out[rel] = data
    return out


def weights_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def diff_keys(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    return sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))


# ---------------------------------------------------------------- inputs shared by the modules


def fisher_inputs(root: Path) -> list[str]:
    """A tiny BERT and 12 rows (a save_to_disk folder: no datasets cache is written when it is read);
    the `fishmerge fisher … --shards 3` arguments for them, with a relative store root (the cwd's)."""
    import datasets
    from fishmerge.io.checkpoint import cached_model_fingerprint

    from tests.conftest import save_model_dir, sentences
    from tests.integration.test_fisher_sharded import fisher_args

    model = save_model_dir(root / "model", "bert-cls")
    cached_model_fingerprint(model)  # its cache beside the model is written here, not by a killed run
    data = root / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sentences(12, seed=7))}).save_to_disk(str(data))
    args = fisher_args({"model": model, "data": data}, "--examples", "12", "--seed", "1", "--batch-size", "4")
    return args + ["--estimator", "exact", "--max-length", "16", "--shards", "3", "--store-root", "fishers"]


def merge_inputs(root: Path) -> dict:
    """Two tiny models with synthetic Fisher stores (the `inputs` fixture of tests/test_merge_cli.py)."""
    from tests.conftest import save_model_dir
    from tests.integration.test_merge_cli import write_fisher

    a = save_model_dir(root / "a", "bert-cls", seed=1)
    b = save_model_dir(root / "b", "bert-cls2", seed=2)
    return {"root": root, "a": a, "b": b, "fa": write_fisher(a, 1), "fb": write_fisher(b, 2)}


def merge_config(inputs: dict, ws: Path, weights: tuple[float, float] = (0.6, 0.4), file: str = "cfg.yaml") -> Path:
    """A Fisher merge of the two inputs, both targets, output `ws/out` (tests/test_merge_cli.py's helpers)."""
    from tests.integration.test_merge_cli import two_models, write_config

    models = two_models(inputs)
    for m, w in zip(models, weights):
        m["weight"] = w
    return write_config(ws / file, models, targets=["a", "b"])


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
