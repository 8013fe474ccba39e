"""`fishmerge server`: one real Prefect server started in the background, found by later commands
without PREFECT_API_URL (their runs land in it), stopped; a record naming another process is never
signalled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import save_model_dir


def fishmerge(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fishmerge.flows.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


@pytest.fixture
def own_env(tmp_path) -> dict:
    """No PREFECT_API_URL (the session's harness sets one): the commands look for the shared server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"FISHMERGE_HOME": str(tmp_path / "fmhome"), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    return env


def flow_names(url: str) -> set[str]:
    request = urllib.request.Request(
        f"{url}/flows/filter", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 (loopback)
        return {f["name"] for f in json.loads(r.read())}


def test_shared_server_is_reused_by_commands_and_stopped(own_env, tmp_path) -> None:
    a = save_model_dir(tmp_path / "a", "bert-cls", seed=1)
    b = save_model_dir(tmp_path / "b", "bert-cls", seed=2)
    cfg = tmp_path / "cfg.yaml"
    models = [{"name": "a", "path": str(a), "weight": 0.5}, {"name": "b", "path": str(b), "weight": 0.5}]
    cfg.write_text(
        json.dumps({"name": "s", "method": "isotropic", "models": models, "targets": ["a"], "output": "out"})
    )

    done = fishmerge(["server", "status"], own_env, tmp_path)
    assert done.returncode == 0 and "no shared Prefect server running" in done.stdout
    started = fishmerge(["server", "start"], own_env, tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.split()[0]
        assert url.startswith("http://127.0.0.1:") and "(started" in started.stdout
        assert "warm runner pid" in started.stdout  # its runner listens (tests/integration/test_warm_runner.py)
        assert (tmp_path / "fmhome" / "warm-runner.sock").exists()
        state = json.loads((tmp_path / "fmhome" / "prefect-server.json").read_text())
        assert state["url"] == url
        again = fishmerge(["server", "start"], own_env, tmp_path)
        assert again.returncode == 0 and again.stdout.startswith(f"{url} (already running")

        merged = fishmerge(["merge", str(cfg), "--no-progress"], own_env, tmp_path)
        assert merged.returncode == 0, merged.stderr
        assert f"reporting to the shared server at {url}" in merged.stderr
        assert "Starting temporary server" not in merged.stderr
        assert (tmp_path / "out" / "a" / "model.safetensors").exists()
        assert "merge-models" in flow_names(url)  # the run is in the shared server, as a person sees it
    finally:
        stopped = fishmerge(["server", "stop"], own_env, tmp_path)
    assert stopped.returncode == 0 and "stopped the shared Prefect server" in stopped.stdout
    assert not Path(f"/proc/{state['pid']}/cmdline").exists() or not Path(f"/proc/{state['pid']}/cmdline").read_bytes()
    assert not (tmp_path / "fmhome" / "prefect-server.json").exists()
    assert _wait_gone(state["runner"]["pid"]) and not (tmp_path / "fmhome" / "warm-runner.sock").exists()
    assert "no shared Prefect server running" in fishmerge(["server", "status"], own_env, tmp_path).stdout


def _wait_gone(pid: int, timeout_s: float = 60.0) -> bool:
    """Whether the process is gone (or a zombie), checked at once and then until `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def test_a_record_of_another_process_is_never_signalled(own_env, tmp_path) -> None:
    home = tmp_path / "fmhome"
    home.mkdir()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"url": "http://127.0.0.1:9/api", "pid": bystander.pid}
        (home / "prefect-server.json").write_text(json.dumps(record))
        assert "no shared Prefect server running" in fishmerge(["server", "status"], own_env, tmp_path).stdout
        stopped = fishmerge(["server", "stop"], own_env, tmp_path)
        assert stopped.returncode == 0 and "no longer runs" in stopped.stdout
        assert bystander.poll() is None  # alive: not a Prefect server, so not ours to stop
        assert not (home / "prefect-server.json").exists()  # the stale record is gone
    finally:
        bystander.kill()
        bystander.wait()
