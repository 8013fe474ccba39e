"""The warm runner (`flows.warm`, `flows.warm_runner`) that `fishmerge server start` starts beside the shared server:
real `fishmerge` console commands are forked from it, run in the caller's folder with the caller's
environment, umask and streams, give the same results and exit statuses as in their own process, report
to the shared server, take Ctrl-C, stop when their caller dies; a caller with other import-time settings
or another code version runs the command itself; `server stop` ends the runner."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fishmerge.flows.warm import PROTOCOL
from safetensors.numpy import load_file

from tests.conftest import save_model_dir, sentences, write_csv
from tests.integration.test_server import _wait_gone

FISHMERGE = str(Path(sys.executable).with_name("fishmerge"))  # the console command, as users run it


def fishmerge(args: list[str], env: dict, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([FISHMERGE, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env, **kw)


def served(home: Path) -> list[tuple[str, int]]:
    """(command, child pid) of every command the runner forked, from its log."""
    text = (home / "warm-runner.log").read_text()
    return [(m[1], int(m[2])) for m in re.finditer(r"command (\S+) in child (\d+)", text)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A warm runner in a home of its own, reporting to the session's Prefect server (the one `fishmerge server
    start` starts beside it is tested in test_server.py); stopped, and checked gone, at the end."""
    root = tmp_path_factory.mktemp("warm")
    home = root / "fmhome"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "FISHMERGE_NO_WARM"}  # tests/conftest.py sets it
    env |= {"FISHMERGE_HOME": str(home)}
    with open(home / "warm-runner.log", "ab") as log:
        runner = subprocess.Popen(
            [sys.executable, "-P", "-m", "fishmerge.flows.warm_runner"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            start_new_session=True,
        )
    sock = home / "warm-runner.sock"
    try:
        assert _wait_for(lambda: sock.exists() or runner.poll() is not None), "the runner did not start"
        assert runner.poll() is None, (home / "warm-runner.log").read_text()
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600  # only its owner may connect
        url = env["PREFECT_API_URL"]
        yield {"root": root, "env": env, "home": home, "url": url, "runner": {"pid": runner.pid}}
    finally:
        runner.terminate()  # as `fishmerge server stop` does
        runner.wait(timeout=60)
    assert not sock.exists()  # it takes its socket away


@pytest.fixture(scope="module")
def merge_inputs(stack) -> Path:
    """Two tiny classifiers and a merge config naming them (its relative output lands beside the config)."""
    root = stack["root"]
    models = []
    for i, name in enumerate("ab"):
        save_model_dir(root / name, "bert-cls", seed=i + 1)
        models.append({"name": name, "path": str(root / name), "weight": 0.5})
    cfg = root / "cfg.json"
    cfg.write_text(
        json.dumps({"name": "w", "method": "isotropic", "models": models, "targets": ["a"], "output": "out"})
    )
    return cfg


def test_a_command_runs_in_the_runner_as_it_runs_in_its_own_process(stack, merge_inputs, tmp_path) -> None:
    env, home = stack["env"], stack["home"]
    for folder in ("warm", "own"):  # the config named relative to each caller's folder, its output beside it
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "cfg.json").write_bytes(merge_inputs.read_bytes())
    before = len(served(home))
    warm = fishmerge(["merge", "cfg.json", "--no-progress"], env, tmp_path / "warm", umask=0o077)
    assert warm.returncode == 0, warm.stderr
    assert [c for c, _ in served(home)[before:]] == ["merge"]  # forked from the runner
    own = fishmerge(["merge", "cfg.json", "--no-progress"], env | {"FISHMERGE_NO_WARM": "1"}, tmp_path / "own")
    assert own.returncode == 0, own.stderr
    assert len(served(home)) == before + 1  # FISHMERGE_NO_WARM: in its own process

    out_warm, out_own = tmp_path / "warm" / "out" / "a", tmp_path / "own" / "out" / "a"  # each caller's folder
    assert warm.stdout.strip().splitlines()[-1] == str(tmp_path / "warm" / "out")
    merged, reference = load_file(out_warm / "model.safetensors"), load_file(out_own / "model.safetensors")
    assert merged.keys() == reference.keys()
    for key in reference:
        assert (merged[key] == reference[key]).all(), key
    assert stat.S_IMODE((out_warm / "model.safetensors").stat().st_mode) == 0o600  # the caller's umask
    assert f"View at {stack['url'].removesuffix('/api')}/runs/flow-run/" in warm.stderr  # the run is in Prefect
    assert "Starting temporary server" not in warm.stderr


def test_the_callers_environment_and_exit_status_pass_through(stack, tmp_path) -> None:
    env, home = stack["env"], stack["home"]
    before = len(served(home))
    narrow = fishmerge(["merge", "--help"], env | {"COLUMNS": "50"}, tmp_path)  # argparse wraps to COLUMNS
    wide = fishmerge(["merge", "--help"], env | {"COLUMNS": "200"}, tmp_path)
    own = fishmerge(["merge", "--help"], env | {"COLUMNS": "50", "FISHMERGE_NO_WARM": "1"}, tmp_path)
    assert narrow.returncode == wide.returncode == own.returncode == 0
    assert narrow.stdout == own.stdout != wide.stdout

    bad = fishmerge(["plan", "no-such-config.yaml"], env, tmp_path)
    own = fishmerge(["plan", "no-such-config.yaml"], env | {"FISHMERGE_NO_WARM": "1"}, tmp_path)
    assert bad.returncode == own.returncode == 2
    assert bad.stderr == own.stderr and bad.stderr.startswith("fishmerge: error:") and bad.stderr.count("\n") == 1
    assert len(served(home)) == before + 3  # the three through the runner; the last in its own process


def test_other_import_time_settings_run_in_the_callers_process(stack, merge_inputs, tmp_path) -> None:
    env, home = stack["env"], stack["home"]
    before = len(served(home))
    done = fishmerge(["plan", str(merge_inputs)], env | {"HF_HOME": str(tmp_path / "hf")}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "fishmerge: note: the warm runner" in done.stderr and "HF_HOME" in done.stderr
    assert "merge plan" in done.stdout
    assert len(served(home)) == before


def _ready_count(home: Path) -> int:
    return (home / "warm-runner.log").read_text().count(" ready in ")


def _wait_for(condition, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _signals(ignored: tuple[int, ...] = ()) -> Callable[[], None]:
    """For Popen's preexec_fn: the caller starts with SIGINT and SIGHUP at their defaults, as from a terminal
    (a background job of a non-interactive shell, such as a CI script, inherits SIGINT ignored), but for
    those `ignored`."""

    def reset() -> None:
        for signum in (signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)

    return reset


def _long_fisher(stack, tmp_path: Path, ignored: tuple[int, ...] = ()) -> tuple[subprocess.Popen, int]:
    """A `fishmerge fisher` of several seconds started through the runner (the caller ignoring `ignored`);
    returns it and the runner's child that runs it, once that child runs `main`."""
    model = save_model_dir(tmp_path / "m", "bert-cls")
    data = write_csv(tmp_path / "rows.csv", sentences(4000))
    args = ["fisher", "--model", str(model), "--data", str(data), "--examples", "4000", "--batch-size", "1"]
    before = len(served(stack["home"]))
    proc = subprocess.Popen(
        [FISHMERGE, *args, "--store", str(tmp_path / "f.zarr"), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=stack["env"],
        preexec_fn=_signals(ignored),
    )
    seen = ""
    while "fisher-missing-shards" not in seen:  # the flow's last task before the shard's ~20 s of work
        line = proc.stderr.readline()
        assert line, seen + proc.stderr.read()
        seen += line
    assert _wait_for(lambda: len(served(stack["home"])) > before, 30)
    time.sleep(2)  # into the shard's work (Prefect itself fails on an interrupt while it starts a task run)
    command, child = served(stack["home"])[before]
    assert command == "fisher" and _parent_of(child) == stack["runner"]["pid"]  # forked by the runner
    return proc, child


def test_ctrl_c_reaches_the_command(stack, tmp_path) -> None:
    proc, child = _long_fisher(stack, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "fishmerge: interrupted" in err
    assert _wait_gone(child)
    assert not (tmp_path / "f.zarr").exists()


def test_a_command_ended_by_a_signal_ends_its_caller_by_it(stack, tmp_path) -> None:
    proc, child = _long_fisher(stack, tmp_path)
    os.kill(child, signal.SIGKILL)  # as the kernel's OOM killer would
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err  # the caller died of it too, as the command's own process would


@pytest.mark.parametrize("caller_ignores", [(), (signal.SIGINT,)], ids=["sigint-handled", "sigint-ignored"])
def test_a_command_whose_caller_dies_is_interrupted(stack, tmp_path, caller_ignores) -> None:
    proc, child = _long_fisher(stack, tmp_path, caller_ignores)
    proc.kill()
    proc.wait()
    assert _wait_gone(child)  # interrupted, not left computing for nobody
    assert not (tmp_path / "f.zarr").exists()


def test_signals_the_caller_ignores_stay_ignored(stack, tmp_path) -> None:
    """`nohup fishmerge …`: the command survives the hang-up, as it would in its own process."""
    proc, child = _long_fisher(stack, tmp_path, (signal.SIGHUP,))
    try:
        ignored = next(ln for ln in Path(f"/proc/{child}/status").read_text().splitlines() if ln.startswith("SigIgn"))
        assert int(ignored.split()[1], 16) & (1 << (signal.SIGHUP - 1))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None and not _wait_gone(child, timeout_s=0)
    finally:
        proc.kill()
        proc.wait()
    assert _wait_gone(child)


def test_closed_standard_streams_run_in_the_callers_process(stack, merge_inputs, tmp_path) -> None:
    env, home = stack["env"], stack["home"]
    before = len(served(home))
    no_stdin = fishmerge(["plan", str(merge_inputs)], env, tmp_path, preexec_fn=lambda: os.close(0))
    assert no_stdin.returncode == 0 and "merge plan" in no_stdin.stdout, no_stdin.stderr
    no_stdout = fishmerge(["plan", str(merge_inputs)], env, tmp_path, preexec_fn=lambda: os.close(1))
    assert no_stdout.returncode == 120  # the result could not be written: never a silent 0
    assert "fishmerge: error: could not write the result to stdout" in no_stdout.stderr
    assert len(served(home)) == before


def test_a_caller_of_another_installation_runs_the_command_itself(stack, merge_inputs, tmp_path) -> None:
    """A request with another code fingerprint (another checkout or virtualenv sharing FISHMERGE_HOME) is
    turned away with a note; the runner does not reload for it and goes on serving."""
    home, env = stack["home"], stack["env"]
    ready = _ready_count(home)
    caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    caller.settimeout(30)
    caller.connect(str(home / "warm-runner.sock"))
    request = {"protocol": PROTOCOL, "code": "another", "argv": ["fishmerge", "--version"], "cwd": str(tmp_path)}
    request |= {"umask": 0o022, "env": env, "ignored_signals": []}
    payload = json.dumps(request).encode()
    socket.send_fds(caller, [b"F"], [0, 1, 2])
    caller.sendall(struct.pack(">I", len(payload)) + payload)
    answer = json.loads(caller.makefile("rb").readline())
    caller.close()
    assert answer["ok"] is False and "another fishmerge installation" in answer["why"]
    before = len(served(home))
    done = fishmerge(["plan", str(merge_inputs)], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(served(home)) == before + 1 and _ready_count(home) == ready


def test_changed_code_runs_here_and_the_runner_reloads(stack, merge_inputs, tmp_path) -> None:
    """A source file of fishmerge changes (its modification time here, the contents untouched): the next
    command runs in its own process, silently; the runner reloads (the same process) and serves the next.
    The time is put back afterwards, and the runner reloads once more."""
    from fishmerge import sizes

    home, env = stack["home"], stack["env"]
    source = Path(sizes.__file__)
    times = source.stat()
    ready = _ready_count(home)
    try:
        os.utime(source, ns=(times.st_atime_ns, times.st_mtime_ns + 1_000_000_000))
        before = len(served(home))
        here = fishmerge(["plan", str(merge_inputs)], env, tmp_path)
        assert here.returncode == 0, here.stderr
        assert "note:" not in here.stderr and len(served(home)) == before
        assert _wait_for(lambda: _ready_count(home) == ready + 1)
        assert "reloading" in (home / "warm-runner.log").read_text()
        assert Path(f"/proc/{stack['runner']['pid']}/cmdline").read_bytes().split(b"\0")[1:4] == [
            b"-P",
            b"-m",
            b"fishmerge.flows.warm_runner",
        ]
        warm = fishmerge(["plan", str(merge_inputs)], env, tmp_path)
        assert warm.returncode == 0, warm.stderr
        assert len(served(home)) == before + 1 and warm.stdout == here.stdout
    finally:
        os.utime(source, ns=(times.st_atime_ns, times.st_mtime_ns))
    # (the next caller is turned away once more, and the runner reloads with the time put back)
