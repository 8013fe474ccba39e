"""The `fishmerge` console command ends without the interpreter's teardown (`flows.cli.run`): its exit
status is main's, and every exit handler registered after it still runs before the process ends."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Registers an exit handler (as Prefect's log drain and temporary server do) once main has started,
# then runs the console command; the handler writes a file, proving it ran before the fast exit.
DRIVER = textwrap.dedent(
    """
    import atexit, sys
    from fishmerge.flows import cli

    marker = sys.argv.pop(1)
    real_main = cli.main

    def main():
        atexit.register(lambda: open(marker, "w").write("ran"))
        return real_main()

    cli.main = main
    cli.run()
    """
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
    marker = tmp_path / "handler-ran"
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(marker), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == status, done.stderr
    assert stderr in done.stderr and "Traceback" not in done.stderr
    assert marker.read_text() == "ran"
    if args == ["--version"]:
        assert done.stdout.startswith("fishmerge ")  # printed output is flushed before the fast exit
