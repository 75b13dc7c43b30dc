"""The router, the pipeline and the serving layer read as one path: no function
in them runs over 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "keel"
LIMIT = 60


@pytest.mark.parametrize("package", ["router", "pipeline", "serving"])
def test_no_function_is_over_60_lines(package: str) -> None:
    long = []
    for path in sorted((PACKAGE / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
