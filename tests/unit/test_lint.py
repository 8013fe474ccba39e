"""The tree stays ruff-clean and ruff-formatted (the checks run with the tests, so CI enforces them)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The environment's own ruff (pinned in pyproject: its formatting style changes between releases) before any on PATH.
RUFF = (
    str(Path(sys.executable).parent / "ruff")
    if (Path(sys.executable).parent / "ruff").exists()
    else shutil.which("ruff")
)


def test_ruff_clean() -> None:
    result = subprocess.run([RUFF, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_formatted() -> None:
    result = subprocess.run([RUFF, "format", "--check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
