"""The package's walls: the import contract of pyproject.toml (import-linter), which must fail when a
wall is broken; the imports of the Triton kernels (outside the e3relax_fast folder, so outside the
contract's reach); and the function-length rule."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
pytestmark = pytest.mark.skipif(not Path(LINT).exists(), reason="import-linter is not installed (the test extra)")


def lint(package_parent: Path, config: Path, *contracts: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    only = [arg for contract in contracts for arg in ("--contract", contract)]
    return subprocess.run([LINT, "--config", str(config), "--no-cache", *only], cwd=package_parent, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_contract_holds():
    result = lint(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("model/layers.py", "from ..training import loss", "model-walls"),
    ("reference/rbf.py", "from .. import batch", "reference-self-contained"),
    ("ops/registry.py", "import ase", "ops-walls"),
    ("training/metrics.py", "import pymatgen", "io-owns-pymatgen-ase"),
])
def test_import_contract_fails_when_a_wall_is_broken(tmp_path, module, line, contract):
    shutil.copytree(ROOT / "e3relax_fast", tmp_path / "e3relax_fast",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "weights"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "e3relax_fast" / module
    target.write_text(target.read_text() + f"\n{line}  # a broken wall\n")
    assert lint(tmp_path, tmp_path / "pyproject.toml", contract).returncode != 0
    # The untouched copy keeps every contract: the failure is the injected import's.
    target.write_text(target.read_text().replace(f"\n{line}  # a broken wall\n", ""))
    assert lint(tmp_path, tmp_path / "pyproject.toml", contract).returncode == 0


# Triton kernels may use torch, triton, the standard library, each other and e3relax_fast.geometry.
KERNEL_IMPORTS = {"torch", "triton", "__future__", "dataclasses", "functools", "math", "os", "typing"}


def test_kernels_import_only_torch_triton_and_geometry():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
                assert roots <= KERNEL_IMPORTS, f"{path.name}: import {roots - KERNEL_IMPORTS}"
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    root = node.module.split(".")[0]
                    assert root in KERNEL_IMPORTS, f"{path.name}: from {node.module} import ..."
                elif node.level == 2:  # e3relax_fast.<module>: only the spec constants and geometry
                    assert node.module == "geometry", f"{path.name}: from ..{node.module} import ..."
                else:
                    assert node.level == 1, f"{path.name}: relative import of level {node.level}"


LONG = 80  # lines of code (docstring excluded)
MARKER = "# Long on purpose:"


def test_long_functions_say_why():
    """No function in e3relax_fast/ longer than 80 lines without a comment saying why."""
    offenders = []
    for path in sorted((ROOT / "e3relax_fast").rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = node.body[0]
            docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            start = first.end_lineno if docstring else node.lineno
            if node.end_lineno - start > LONG and not any(MARKER in ln for ln in lines[start:node.end_lineno]):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not offenders, f"functions over {LONG} lines without a '{MARKER}' comment: {offenders}"
