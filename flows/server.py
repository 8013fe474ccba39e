"""A Prefect server shared by the fishmerge commands of this machine.

Without `PREFECT_API_URL`, every command that runs a flow (`fisher`, `merge`, `run`) makes Prefect start
a temporary server (6-11 s, more than a small merge itself). `fishmerge server start` starts one server
in the background instead; each later command without `PREFECT_API_URL` finds it (its state file names
the URL and process) and reports to it, so runs still appear in Prefect and no command pays the start.
The server keeps Prefect's own database (PREFECT_HOME), the one temporary servers use. `fishmerge server
stop` ends it: only the process fishmerge started and recorded, checked to be that Prefect server.
Imports no Prefect (the `prefect` command runs in its own process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fishmerge.errors import FishmergeError

STATE_NAME = "prefect-server.json"
START_TIMEOUT_S = 120.0


def state_path() -> Path:
    """Where the shared server is recorded: $FISHMERGE_HOME (default ~/.fishmerge)/prefect-server.json."""
    return Path(os.environ.get("FISHMERGE_HOME") or "~/.fishmerge").expanduser() / STATE_NAME


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:  # noqa: S310 (a loopback URL we wrote)
            return r.status == 200
    except (OSError, ValueError):
        return False


def _is_our_server(pid: int) -> bool:
    """Whether `pid` is alive and is a `prefect server start` (a recycled pid is not ours to signal)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [w.decode(errors="replace") for w in cmdline]
    return any(w.endswith("prefect") for w in words) and "server" in words and "start" in words


def _read_state() -> dict | None:
    try:
        state = json.loads(state_path().read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(state, dict) and isinstance(state.get("url"), str) and isinstance(state.get("pid"), int)
    return state if ok else None


def running() -> dict | None:
    """The recorded shared server if it is alive and answers its health check, else None."""
    state = _read_state()
    if state and _is_our_server(state["pid"]) and _healthy(state["url"]):
        return state
    return None


def use_shared_server() -> str | None:
    """Point this process's Prefect at the shared server when one runs and PREFECT_API_URL is unset."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    state = running()
    if state is None:
        return None
    os.environ["PREFECT_API_URL"] = state["url"]
    return state["url"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int | None = None) -> dict:
    """Start the shared server in the background (or return the running one) and record it."""
    found = running()
    if found:
        return {**found, "started": False}
    prefect = Path(sys.executable).with_name("prefect")
    if not prefect.exists():
        raise FishmergeError(f"no `prefect` command beside {sys.executable}: reinstall fishmerge (pip install -e .)")
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = path.with_name("prefect-server.log")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives this command; its own process group for `stop`
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            raise FishmergeError(
                f"the Prefect server did not start on port {port} within {START_TIMEOUT_S:.0f} s (exit code "
                f"{proc.poll()}): see {log}"
            )
        time.sleep(0.3)
    state = {"url": url, "pid": proc.pid, "port": port, "log": str(log), "started_at": time.time()}
    tmp = path.with_name(f".{STATE_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)
    return {**state, "started": True}


def stop(timeout_s: float = 20.0) -> dict | None:
    """Stop the recorded server (its process group) and remove the record: the record with `stopped`
    (False when its process was gone or is not a Prefect server), None when there was no record."""
    state = _read_state()
    if state is None:
        return None
    pid = state["pid"]
    alive = _is_our_server(pid)
    if alive:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _is_our_server(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _is_our_server(pid):
            os.killpg(pid, signal.SIGKILL)
    state_path().unlink(missing_ok=True)
    return {**state, "stopped": alive}
