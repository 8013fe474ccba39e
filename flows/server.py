"""A Prefect server shared by the fishmerge commands of this machine.

Without `PREFECT_API_URL`, every command that runs a flow (`fisher`, `merge`, `run`) makes Prefect start
a temporary server (6-11 s, more than a small merge itself). `fishmerge server start` starts one server
in the background instead; each later command without `PREFECT_API_URL` finds it (its state file names
the URL and process) and reports to it, so runs still appear in Prefect and no command pays the start.
The server keeps Prefect's own database (PREFECT_HOME), the one temporary servers use. `fishmerge server
stop` ends it: only the process fishmerge started and recorded, checked to be that Prefect server.
Beside it runs the warm runner (`flows.warm`, `flows.warm_runner`): a process with fishmerge's stack imported that forks a
copy of itself for each later command, so that a small command no longer pays its imports; recorded,
checked and stopped the same way. Imports no Prefect (the `prefect` command runs in its own process).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

from fishmerge.errors import FishmergeError

STATE_NAME = "prefect-server.json"
RUNNER_SOCKET_NAME = "warm-runner.sock"
RUNNER_LOG_NAME = "warm-runner.log"
RUNNER_LOG_MAX_BYTES = 8 * 1024 * 1024
START_TIMEOUT_S = 120.0
STATE_MAX_BYTES = 64 * 1024


def state_path() -> Path:
    """Where the shared server is recorded: $FISHMERGE_HOME (default ~/.fishmerge)/prefect-server.json."""
    return Path(os.environ.get("FISHMERGE_HOME") or "~/.fishmerge").expanduser() / STATE_NAME


def runner_socket_path() -> Path:
    """The warm runner's Unix socket, beside the server's record."""
    return state_path().with_name(RUNNER_SOCKET_NAME)


def runner_log_path() -> Path:
    return state_path().with_name(RUNNER_LOG_NAME)


def runner_listening() -> bool:
    """Whether a warm runner's socket is in place (it appears once the runner has imported everything)."""
    try:
        return stat.S_ISSOCK(os.stat(runner_socket_path()).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One start or stop at a time on this machine (two `server start` at once would start two servers)."""
    path = state_path().with_name("prefect-server.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _healthy(url: str, timeout: float = 2.0) -> bool:
    import urllib.request  # here: every `fishmerge` command imports this module to look for the runner

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:  # noqa: S310 (a loopback URL we wrote)
            return r.status == 200
    except (OSError, ValueError):
        return False


def _started_at(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if gone."""
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(line.rsplit(")", 1)[1].split()[19])


def _command_line(record: dict | None) -> list[str] | None:
    """The command line of the recorded process if it still runs and is the one fishmerge started (same
    start time: a recycled pid has another), else None."""
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    pid = record["pid"]
    if _started_at(pid) != record.get("process_start"):
        return None
    try:
        return [w.decode(errors="replace") for w in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None


def _is_ours(state: dict) -> bool:
    """Whether the recorded process is the server fishmerge started: a `prefect server start` on the
    recorded port."""
    words = _command_line(state) or []
    shape = any(w.endswith("prefect") for w in words) and "server" in words and "start" in words
    return shape and str(state.get("port")) in words


def runner_alive(state: dict | None) -> bool:
    """Whether the warm runner recorded with the server is the one fishmerge started and still runs (it
    may still be warming up)."""
    return "fishmerge.flows.warm_runner" in (_command_line((state or {}).get("runner")) or [])


def _read_state() -> dict | None:
    try:
        with open(state_path(), "rb") as fh:
            state = json.loads(fh.read(STATE_MAX_BYTES))
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("url"), str)
        and state["url"].startswith("http://127.0.0.1:")  # a loopback server of ours, nothing else
        and isinstance(state.get("pid"), int)
    )
    return state if ok else None


def running() -> dict | None:
    """The recorded shared server if it is ours, alive and answers its health check, else None."""
    state = _read_state()
    if state and _is_ours(state) and _healthy(state["url"]):
        return state
    return None


def _profile_api_url() -> str | None:
    """PREFECT_API_URL of the active Prefect profile (profiles.toml), read without importing Prefect."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        with open(path, "rb") as fh:
            data = tomllib.loads(fh.read(STATE_MAX_BYTES).decode())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active")
    profile = (data.get("profiles") or {}).get(active) or {}
    value = profile.get("PREFECT_API_URL") if isinstance(profile, dict) else None
    return value if isinstance(value, str) and value else None


def use_shared_server() -> str | None:
    """Point this process's Prefect at the shared server when one runs and no PREFECT_API_URL is set (in
    the environment or the active Prefect profile: a configured server always wins)."""
    if os.environ.get("PREFECT_API_URL") or _profile_api_url():
        return None
    state = running()
    if state is None:
        return None
    os.environ["PREFECT_API_URL"] = state["url"]
    refresh_prefect_settings()
    return state["url"]


def refresh_prefect_settings() -> None:
    """Make an already imported Prefect read its settings again (environment, profile, the working folder's
    prefect.toml / .env): Prefect keeps what it read when imported, and the warm runner imports it before
    it knows a command's environment and folder. Nothing to do when Prefect is not imported yet."""
    context = sys.modules.get("prefect.context")
    if context is not None:
        context.refresh_global_settings_context()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _write_state(state: dict) -> None:
    path = state_path()
    tmp = path.with_name(f".{STATE_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _wait_healthy(state: dict, proc: subprocess.Popen | None) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        alive = proc.poll() is None if proc is not None else _is_ours(state)
        if not alive:
            return False
        if _healthy(state["url"]):
            return True
        time.sleep(0.3)
    return False


def _start_runner() -> dict:
    """Start the warm runner in the background with this command's environment; its record. A socket left
    by a runner that was killed (nothing accepts on it) is removed first: the new runner's appears once
    it is ready."""
    path = runner_socket_path()
    if runner_listening():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink(missing_ok=True)
    log = runner_log_path()
    with contextlib.suppress(OSError):
        if log.stat().st_size > RUNNER_LOG_MAX_BYTES:  # a line per command: keep the last two logs' worth
            os.replace(log, log.with_name(f"{log.name}.1"))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "fishmerge.flows.warm_runner"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command
            cwd="/",  # no folder's configuration files (matplotlibrc, prefect.toml) read at its imports
        )
    return {"pid": proc.pid, "process_start": _started_at(proc.pid), "log": str(log), "proc": proc}


def _wait_runner(state: dict, proc: subprocess.Popen | None) -> bool:
    """Wait until the recorded runner listens (its socket appears once it has imported everything) or is gone."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not (proc.poll() is None if proc is not None else runner_alive(state)):
            return False
        if runner_listening():
            return True
        time.sleep(0.1)
    return False


def start(port: int | None = None) -> dict:
    """Start the shared server and the warm runner in the background (or return the running ones, starting
    a runner that is missing) and record them. A runner that fails to start leaves the server running:
    commands then run in their own process (`runner_ready` False)."""
    prefect = Path(sys.executable).with_name("prefect")
    if not prefect.exists():
        raise FishmergeError(f"no `prefect` command beside {sys.executable}: reinstall fishmerge (pip install -e .)")
    with _locked():
        recorded = _read_state()
        if recorded and _is_ours(recorded):  # ours and alive: running, or still starting (wait for it)
            if not _wait_healthy(recorded, None):
                raise FishmergeError(
                    f"the shared Prefect server (pid {recorded['pid']}) runs but does not answer at "
                    f"{recorded['url']}: see {recorded.get('log')}; `fishmerge server stop` ends it"
                )
            if runner_alive(recorded):  # running, importing or reloading: wait for it to listen
                return {**recorded, "started": False, "runner_ready": _wait_runner(recorded, None)}
            runner = _start_runner()
            state = {**recorded, "runner": {k: v for k, v in runner.items() if k != "proc"}}
            _write_state(state)
            return {**state, "started": False, "runner_ready": _wait_runner(state, runner["proc"])}
        if port is not None and not _port_free(port):
            raise FishmergeError(f"port {port} is in use: choose another --port, or leave it out (a free one)")
        port = port or _free_port()
        log = state_path().with_name("prefect-server.log")
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
        state = {
            "url": f"http://127.0.0.1:{port}/api",
            "pid": proc.pid,
            "process_start": _started_at(proc.pid),
            "port": port,
            "log": str(log),
            "started_at": time.time(),
        }
        runner: dict | None = None
        try:
            _write_state(state)  # recorded at once: a later `stop` finds it even if this command dies now
            runner = _start_runner()  # warms up while the server starts
            state["runner"] = {k: v for k, v in runner.items() if k != "proc"}
            _write_state(state)
            if not _wait_healthy(state, proc):
                raise FishmergeError(
                    f"the Prefect server did not start on port {port} within {START_TIMEOUT_S:.0f} s (exit code "
                    f"{proc.poll()}): see {log}"
                )
            ready = _wait_runner(state, runner["proc"])
        except BaseException:  # an error or Ctrl-C: no server or runner is left running unrecorded
            _end(proc.pid)
            if runner is not None:
                _end(runner["pid"])
            state_path().unlink(missing_ok=True)
            raise
        return {**state, "started": True, "runner_ready": ready}


def _end(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group of `pid` (SIGKILL after `timeout_s`); gone already is fine."""
    try:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _started_at(pid) is not None and time.monotonic() < deadline:
            try:  # reap it when it is our own child (a zombie keeps its /proc entry)
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop() -> dict | None:
    """Stop the recorded server (its process group) and warm runner (commands it runs still end normally)
    and remove the record: the record with `stopped` (False when the server is gone, or is not the server
    fishmerge started), None when there was no record."""
    with _locked():
        state = _read_state()
        if state is None:
            return None
        if runner_alive(state):  # it stops taking commands at once and ends when those it runs have ended
            with contextlib.suppress(ProcessLookupError):
                os.kill(state["runner"]["pid"], signal.SIGTERM)
        ours = _is_ours(state)
        if ours:
            _end(state["pid"])
        state_path().unlink(missing_ok=True)
        return {**state, "stopped": ours}
