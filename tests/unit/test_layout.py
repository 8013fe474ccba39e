"""The house rules, checked: the core never imports Prefect (even indirectly), one import name is
installed, unit tests stay on the core, and no code outside a merge method's own module branches on
the method's name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from fishmerge.merge.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "lib" / "fishmerge"


def core_modules() -> list[str]:
    out = []
    for p in sorted(CORE.rglob("*.py")):
        parts = list(p.relative_to(CORE.parent).with_suffix("").parts)
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_the_core_never_imports_prefect() -> None:
    """Importing every core module (transitively) loads no Prefect module."""
    code = (
        "import importlib, sys\n"
        f"for m in {core_modules()!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "", f"the core imported {out.stdout.strip()[:200]}"


def test_one_import_name(tmp_path: Path) -> None:
    """`fishmerge` and its subpackages resolve inside lib/fishmerge, tasks/ and flows/ (no lib/tasks/flows)."""
    import importlib.util

    import fishmerge

    assert Path(fishmerge.__file__).parent == CORE
    for sub, folder in (("tasks", "tasks"), ("flows", "flows")):  # found, not imported (no Prefect here)
        assert Path(importlib.util.find_spec(f"fishmerge.{sub}").origin).parent == ROOT / folder
    code = "import importlib.util as u; print([n for n in ('lib', 'tasks', 'flows') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"


def _name_branches(path: Path) -> list[str]:
    """Comparisons (==, !=, in, not in) against a registered method's name in one source file."""
    names = set(METHODS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            consts = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_branch_on_a_method_name_outside_its_module() -> None:
    methods_dir = CORE / "merge" / "methods"
    files = [p for d in (CORE, ROOT / "tasks", ROOT / "flows") for p in d.rglob("*.py")]
    found = [hit for p in files if methods_dir not in p.parents for hit in _name_branches(p)]
    assert found == [], f"branches on a merge method's name: {found}"


def test_each_package_names_its_public_api() -> None:
    import importlib

    for pkg in ("fishmerge.fisher", "fishmerge.io", "fishmerge.merge", "fishmerge.pipeline", "fishmerge.registry"):
        mod = importlib.import_module(pkg)
        assert mod.__all__, pkg
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"{pkg}.{name}"


def test_unit_tests_use_the_core_only() -> None:
    """tests/unit/ imports no Prefect, flows or tasks (the server fixture lives in tests/integration/)."""
    banned = ("prefect", "fishmerge.flows", "fishmerge.tasks")
    found = []
    for p in sorted((ROOT / "tests" / "unit").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [
                f"{p.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "prefect" or n.startswith(banned[1:])
            ]
    assert found == [], found
