"""Test-side launcher that SIGKILLs `fishmerge` at its N-th commit-ish call, like an OOM kill or a lost node.

    python -m tests.integration.killpoint --at N -- <fishmerge args…>
    python -m tests.integration.killpoint --trace FILE -- <fishmerge args…>

It wraps a fixed set of stable, public primitives — file-system steps that commit something
(`os.rename`, `os.replace`, `os.pwrite`, `os.fsync`, `os.mkdir`, `os.makedirs`, `os.rmdir`,
`os.unlink`, `os.remove`, `shutil.rmtree`) and the MLflow calls that change tracking or registry
state (`MlflowClient.create_run`, `log_batch`, `set_terminated`, `create_model_version`,
`set_model_version_tag`, `set_registered_model_alias`, …, `mlflow.register_model`) — then runs
`flows.cli.main(args)` in this fresh process. No hook lives in production code.

Calls are counted across all threads under one lock. With `--at N` the N-th counted call kills
the process with SIGKILL (no cleanup code runs): just before the real call when N is odd, just
after it when N is even; `--side before|after` overrides that alternation, so that both sides
of one call can be drawn (the window after a store's rename is the window before the removal
of its partials: with the alternation alone, one of two neighbouring windows is never hit).
With `--trace FILE` (no `--at`) the command runs normally and, at exit, FILE receives JSON
`{"total": n, "calls": [name, …], "args": [short first argument, …]}` so a test can draw kill
points in [1, total].

`--serve` starts a fork server instead (see `serve`): tests fork each run from a process that
imported fishmerge once, and pay no start-up per run.

Not counted: calls made while a module is being imported (bytecode caches, import-time set-up),
calls made by the `logging` machinery, and file-system calls made inside another counted
file-system call (`os.makedirs` → `os.mkdir`, `shutil.rmtree` → `os.unlink` count once).
MLflow calls are counted when nested (`mlflow.register_model` → `create_registered_model`), and
file-system calls inside MLflow calls (artifact copies) are counted too.
"""

from __future__ import annotations

import argparse
import atexit
import fnmatch
import functools
import json
import os
import shutil
import signal
import sys
import threading

FS_PRIMITIVES = [
    (os, "rename"),
    (os, "replace"),
    (os, "pwrite"),
    (os, "fsync"),
    (os, "mkdir"),
    (os, "makedirs"),
    (os, "rmdir"),
    (os, "unlink"),
    (os, "remove"),
    (shutil, "rmtree"),
]

# MlflowClient methods that change tracking or registry state (those present in the installed MLflow).
MLFLOW_CLIENT_METHODS = [
    "create_experiment",
    "restore_experiment",
    "set_experiment_tag",
    "create_run",
    "set_terminated",
    "update_run",
    "log_batch",
    "log_metric",
    "log_param",
    "set_tag",
    "log_text",
    "log_dict",
    "log_artifact",
    "log_artifacts",
    "log_inputs",
    "log_outputs",
    "create_logged_model",
    "finalize_logged_model",
    "set_logged_model_tags",
    "log_model_params",
    "create_registered_model",
    "create_model_version",
    "set_model_version_tag",
    "delete_model_version_tag",
    "set_registered_model_alias",
    "delete_registered_model_alias",
    "set_registered_model_tag",
    "transition_model_version_stage",
]

MLFLOW_COMMANDS = {"run", "promote", "history"}  # the fishmerge commands that use MLflow

_lock = threading.Lock()
_local = threading.local()
_state: dict = {"active": False, "at": None, "side": None, "count": 0, "calls": [], "args": [], "sync": None}
_real_kill = os.kill
_real_getpid = os.getpid


def _die() -> None:
    _real_kill(_real_getpid(), signal.SIGKILL)


def _excluded() -> bool:
    """True inside an import or the logging machinery (not a step of the command)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith("<frozen importlib") or f"{os.sep}logging{os.sep}" in name:
            return True
        f = f.f_back
    return False


def _short(args: tuple) -> str:
    if not args:
        return ""
    a = args[0]
    if isinstance(a, (str, bytes, os.PathLike)):
        return os.path.basename(os.fsdecode(a))[:60]
    if isinstance(a, int):
        return "fd"
    return type(a).__name__[:40]


def _before(n: int) -> bool:
    """Whether kill point n strikes before its call (else just after it)."""
    side = _state["side"]
    return side == "before" if side else n % 2 == 1


def _count(name: str, args: tuple) -> int:
    """Count this call; return its number, or 0 when it is not counted."""
    if not _state["active"] or _excluded():
        return 0
    meet = None
    with _lock:
        _state["count"] += 1
        n = _state["count"]
        if _state["at"] is None:
            _state["calls"].append(name)
            _state["args"].append(_short(args))
        elif n == _state["at"] and _before(n):
            _die()  # before the real call (the lock is held: no other counted call runs meanwhile)
        sync = _state["sync"]
        if sync and sync["next"] < len(sync["points"]):
            point = sync["points"][sync["next"]]
            if fnmatch.fnmatch(name, point.get("name", "*")) and fnmatch.fnmatch(_short(args), point.get("arg", "*")):
                meet = sync["next"]
                sync["next"] += 1
    if meet is not None:
        _rendezvous(meet)
    return n


def _rendezvous(i: int) -> None:
    """Wait, before the call, until `count` processes reached sync point i (or the timeout passed)."""
    import time

    sync = _state["sync"]
    folder = sync["dir"]
    open(os.path.join(folder, f"{i}-{_real_getpid()}"), "w").close()
    deadline = time.monotonic() + float(sync.get("timeout", 20))
    while time.monotonic() < deadline:
        if sum(name.startswith(f"{i}-") for name in os.listdir(folder)) >= int(sync["count"]):
            return
        time.sleep(0.005)


def _after(n: int) -> None:
    if n and n == _state["at"] and not _before(n):
        _die()  # just after the real call (also when it raised)


def _fs_wrap(real, name: str):
    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        depth = getattr(_local, "fs_depth", 0)
        n = _count(name, args) if depth == 0 else 0
        _local.fs_depth = depth + 1
        try:
            return real(*args, **kwargs)
        finally:
            _local.fs_depth = depth
            _after(n)

    return wrapper


def _mlflow_wrap(real, name: str):
    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        n = _count(name, ())
        try:
            return real(*args, **kwargs)
        finally:
            _after(n)

    return wrapper


def install(at: int | None, side: str | None = None, with_mlflow: bool = True, sync: dict | None = None) -> None:
    """Wrap the primitives and start counting (`at`: the call that kills, None to trace only; `side`:
    "before" or "after" it, None for the alternation by parity).

    with_mlflow=False leaves MLflow alone (and unimported: a second of start-up saved).
    sync: {"dir": DIR, "count": N, "points": [{"name": pattern, "arg": pattern}, …], "timeout": s} —
    processes started together meet before each point in turn (the first counted call whose name and
    short first argument match, fnmatch): each waits until N of them got there, so that their
    critical steps overlap although their start-up (Prefect's API retries, say) did not.
    """
    for module, attr in FS_PRIMITIVES:
        setattr(module, attr, _fs_wrap(getattr(module, attr), f"{module.__name__}.{attr}"))
    if with_mlflow:
        _install_mlflow()
    _state.update(at=at, side=side, count=0, calls=[], args=[], sync={**sync, "next": 0} if sync else None)
    _state["active"] = True


def _install_mlflow() -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    for attr in MLFLOW_CLIENT_METHODS:
        real = getattr(MlflowClient, attr, None)
        if real is not None:
            setattr(MlflowClient, attr, _mlflow_wrap(real, f"mlflow.MlflowClient.{attr}"))
    mlflow.register_model = _mlflow_wrap(mlflow.register_model, "mlflow.register_model")


def write_trace(path: str) -> None:
    _state["active"] = False
    with open(path, "w") as f:
        json.dump({"total": _state["count"], "calls": _state["calls"], "args": _state["args"]}, f)


def run(args: list[str], at: int | None = None, side: str | None = None, sync: dict | None = None) -> int:
    """Run `fishmerge args` in this process under the wrappers (the launcher's and a fork server child's job)."""
    from fishmerge.flows.cli import main as fishmerge

    install(at, side, with_mlflow=bool(set(args) & MLFLOW_COMMANDS) or "mlflow" in sys.modules, sync=sync)
    return fishmerge(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--serve"]:
        return serve()
    if "--" not in argv:
        raise SystemExit("usage: python -m tests.integration.killpoint (--at N | --trace FILE) -- <fishmerge args…>")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="killpoint")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--at", type=int, help="SIGKILL at this counted call (odd: before it, even: after it)")
    group.add_argument("--trace", help="run normally; write the counted calls to this JSON file at exit")
    parser.add_argument("--side", choices=["before", "after"], help="with --at: kill before/after the call")
    opts = parser.parse_args(argv[:split])
    if opts.at is not None and opts.at < 1:
        parser.error("--at must be ≥ 1")
    if opts.side and opts.at is None:
        parser.error("--side needs --at")
    if opts.trace:
        atexit.register(write_trace, opts.trace)  # registered first, so it runs last (threads joined)
    return run(argv[split + 1 :], opts.at, opts.side)


# ---------------------------------------------------------------- fork server (start-up paid once)

PRELOAD = [
    "fishmerge.flows.cli",
    "fishmerge.flows.estimate_fisher",
    "fishmerge.flows.merge",
    "fishmerge.flows.pipeline",
    "fishmerge.tasks.fisher",
    "fishmerge.tasks.merge",
    "fishmerge.tasks.pipeline",
    "fishmerge.registry",
    "fishmerge.registry.tracking",
    "fishmerge.pipeline.baselines",
    "fishmerge.pipeline.report",
    "fishmerge.merge.executor",
    "fishmerge.pipeline.search",
    "fishmerge.fisher.job",
    "fishmerge.fisher.report",
    "mlflow",
    "mlflow.pyfunc",
    "datasets",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "transformers.models.bert.tokenization_bert",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
    "matplotlib.pyplot",
    "prefect.artifacts",
    "sqlalchemy",
    "alembic",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.db.utils",
    "mlflow.tracing.fluent",
    "mlflow.models",
    "git",
    "mlflow.tracing.provider",
    "opentelemetry.sdk.trace",
    "graphviz",
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.utilities.visualization",
    "prefect.concurrency.sync",
    "prefect.concurrency.v1.sync",
    "distributed",
    "PIL.Image",
]


def serve() -> int:
    """Fork server: import fishmerge's modules once (importing them starts no thread, so forking is
    safe), then for each JSON request line on stdin run chains of jobs, each job a fresh child
    that runs one command exactly as the launcher does; answer one JSON line with the statuses.

    Request: {"chains": [[job, …], …]} — the chains run at the same time (their first jobs are forked
    back to back), the jobs of a chain one after the other. A job: {"args": [...], "at": N|null,
    "side": "before"|"after"|null, "sync": {...}|null (see `install`), "trace": FILE|null, "cwd": DIR,
    "env": {...}, "stdout": FILE, "stderr": FILE, "timeout": seconds}.
    Answer: {"chains": [[{"returncode": rc (-signal when killed), "timed_out": bool}, …], …]}; a
    job past its timeout is SIGKILLed.
    """
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if threading.active_count() != 1:
        print(f"killpoint: {threading.active_count()} threads after the imports: forking is unsafe", file=sys.stderr)
        return 1
    proto_out = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not corrupt the protocol
    print(json.dumps({"ready": True}), file=proto_out, flush=True)
    for line in sys.stdin:
        runners = [_fork_chain(chain, proto_out) for chain in json.loads(line)["chains"]]
        answers = []
        for pid, path in runners:
            os.waitpid(pid, 0)
            with open(path) as f:
                answers.append(json.loads(f.read() or "null"))
            os.unlink(path)
        print(json.dumps({"chains": answers}), file=proto_out, flush=True)
    return 0


def _fork_chain(chain: list[dict], proto_out) -> tuple[int, str]:
    """A child (still thread-free) that runs the chain's jobs in turn and writes their statuses to a
    file; (its pid, the file)."""
    import tempfile
    import time

    fd, path = tempfile.mkstemp(prefix="killpoint-chain-", suffix=".json")
    os.close(fd)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid, path
    try:
        proto_out.close()
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        statuses = []
        for job in chain:
            started, child = time.monotonic(), _fork_job(job)
            timed_out = False
            while True:
                done, status = os.waitpid(child, os.WNOHANG)
                if done:
                    break
                if time.monotonic() - started > float(job.get("timeout") or 600):
                    timed_out = True
                    os.kill(child, signal.SIGKILL)
                time.sleep(0.02)
            statuses.append({"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out})
        with open(path, "w") as f:
            json.dump(statuses, f)
    finally:
        os._exit(0)


def _fork_job(job: dict) -> int:
    """A fresh child running one command (stdout and stderr to the job's files); its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.chdir(job["cwd"])
        os.environ.update(job.get("env") or {})
        try:
            code = run(job["args"], job.get("at"), job.get("side"), job.get("sync"))
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 2
        if job.get("trace"):
            write_trace(job["trace"])
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # the parent's atexit handlers are not this process's; leftover threads end with it


class ForkServer:
    """Client of `serve()`: start it once (after the environment Prefect reads at import is set), then
    `run([job, …])` as often as needed."""

    def __init__(self, cwd: str, env: dict | None = None):
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.killpoint", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the killpoint fork server did not start")

    def run(self, chains: list[list[dict]]) -> list[list[dict]]:
        """Run the chains at the same time, the jobs of each in turn; their statuses (see `serve`)."""
        self.proc.stdin.write(json.dumps({"chains": chains}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the killpoint fork server died")
        return json.loads(line)["chains"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
