"""The production-like stack (`deployments/stack.sh`) for tests: free ports, up/down/status, its
processes and logs, and a small two-target pipeline config to run on it."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deployments" / "stack.sh"


def pipeline_config(root: Path) -> Path:
    """Two tiny BERT classifiers with their own small tasks, and a pipeline config over them."""
    import datasets
    import yaml

    from tests.conftest import save_model_dir, sentences

    models = []
    for name, kind, k in (("three", "bert-cls", 3), ("two", "bert-cls2", 2)):
        save_model_dir(root / name, kind, seed=k)
        rows = sentences(48, seed=k)
        for r in rows:
            r["label"] = r["label"] % k
        ds = datasets.Dataset.from_list(rows)
        splits = {
            "train": ds.select(range(24)),
            "validation": ds.select(range(24, 36)),
            "test": ds.select(range(36, 48)),
        }
        datasets.DatasetDict(splits).save_to_disk(str(root / f"{name}-data"))
        models.append(
            {
                "name": name,
                "path": str(root / name),
                "weight": 0.5,
                "data": {"path": str(root / f"{name}-data"), "text_fields": ["text"], "label_field": "label"},
            }
        )
    cfg = {
        "name": "stack-test",
        "method": "fisher",
        "models": models,
        "fisher": {"examples": 8, "max_length": 16, "store_root": str(root / "fishers")},
        "output": str(root / "merged"),
        "search": {"points": 3, "limit": 12},
        "evaluate": {"max_length": 16},
        "register": {"name": "stack-test", "promote": {"metric": "three/accuracy"}},
        # no mlflow key: the stack gives every flow run MLFLOW_TRACKING_URI (its server), which wins
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stack(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(STACK), *args], env=env, capture_output=True, text=True, timeout=timeout)


def exports(stdout: str) -> dict[str, str]:
    lines = [ln.removeprefix("export ") for ln in stdout.splitlines() if ln.startswith("export ")]
    return dict(ln.split("=", 1) for ln in lines)


def stack_processes(state: Path) -> list[tuple[psutil.Process, str]]:
    """Live processes carrying this stack's marker (stack.sh puts it in every part's environment)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("FISHMERGE_STACK_MEMBER") == str(state):
                found.append((p, f"{p.pid} {' '.join(p.cmdline())}"))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def log_tail(state: Path, name: str, n: int = 40) -> str:
    path = state / "logs" / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def stack_env(state: Path) -> tuple[dict[str, str], tuple[int, int, int]]:
    """The environment of a stack in `state` on free loopback ports (Prefect, MLflow, Dask), without the
    GPU worker, and those ports. The caller's Prefect/MLflow settings (the test harness's
    PREFECT_API_URL) never reach the stack."""
    ports = tuple(free_ports(3))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "FISHMERGE_STACK_DIR": str(state),
        "FISHMERGE_PREFECT_PORT": str(ports[0]),
        "FISHMERGE_MLFLOW_PORT": str(ports[1]),
        "FISHMERGE_DASK_PORT": str(ports[2]),
        "FISHMERGE_STACK_GPU_WORKER": "0",
    }
    return env, ports
