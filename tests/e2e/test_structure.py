"""The size limits of issue 13 hold for every module of both packages: small modules named for what they hold,
short functions. A change that outgrows them fails here, not in a later review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ROOT / "operator" / "nnunet_distill_operator", ROOT / "trainer_image" / "nnunet_distill")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MODULES = sorted(p for package in PACKAGES for p in package.rglob("*.py"))


def test_both_packages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in MODULES}
    assert {"operator/nnunet_distill_operator/api.py", "trainer_image/nnunet_distill/trainer.py"} <= names


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_and_function_sizes(module: Path):
    source = module.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, from line {node.lineno})"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
