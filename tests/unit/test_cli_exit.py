"""The `fishmerge` console command ends without the interpreter's teardown (`flows.cli.run`): its exit
status is main's, printed output is flushed, every exit handler registered after it still runs before
the process ends, and the teardown itself (module cleanup) is skipped unless FISHMERGE_NO_FAST_EXIT is set."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Registers an exit handler (as Prefect's log drain and temporary server do) once main has started,
# and an object whose __del__ runs only at the interpreter's teardown of this module; then runs the
# console command. With FAIL_WITH set, main ends by raising SystemExit with that message instead.
DRIVER = textwrap.dedent(
    """
    import atexit, os, sys
    from fishmerge.flows import cli

    folder = sys.argv.pop(1)
    real_main = cli.main

    class TornDown:
        def __del__(self, open=open, path=os.path.join(folder, "torn-down")):  # bound now: at teardown
            with open(path, "w") as f:  # the module globals may already be gone
                f.write("yes")

    keep = TornDown()

    def main():
        atexit.register(lambda: open(os.path.join(folder, "handler-ran"), "w").write("ran"))
        if os.environ.get("FAIL_WITH"):
            raise SystemExit(os.environ["FAIL_WITH"])
        return real_main()

    cli.main = main
    cli.run()
    """
)


def _drive(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "FISHMERGE_NO_FAST_EXIT")}
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ | env,
    )


@pytest.mark.parametrize(
    ("args", "status", "stderr"),
    [
        (["--version"], 0, ""),
        (["fisher", "--no-such-flag"], 2, "fishmerge: error:"),
        (["fisher", "--model", "/nonexistent", "--data", "/nonexistent.csv"], 2, "fishmerge: error: data path"),
    ],
)
def test_run_keeps_the_status_and_runs_later_exit_handlers(tmp_path: Path, args, status, stderr) -> None:
    done = _drive(tmp_path, args)
    assert done.returncode == status, done.stderr
    assert stderr in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "handler-ran").read_text() == "ran"
    assert not (tmp_path / "torn-down").exists()  # the module teardown was skipped
    if args == ["--version"]:
        assert done.stdout.startswith("fishmerge ")  # block-buffered stdout, flushed before the fast exit


def test_a_message_exit_is_printed_and_the_opt_out_keeps_pythons_exit(tmp_path: Path) -> None:
    done = _drive(tmp_path, [], FAIL_WITH="boom")
    assert done.returncode == 1 and done.stderr.strip().endswith("boom")
    opted = tmp_path / "opted-out"
    opted.mkdir()
    done = _drive(opted, ["--version"], FISHMERGE_NO_FAST_EXIT="1")
    assert done.returncode == 0 and done.stdout.startswith("fishmerge ")
    assert (opted / "handler-ran").read_text() == "ran"
    assert (opted / "torn-down").read_text() == "yes"  # Python's own exit tore the module down
