"""The plugin folder works as cloned into ComfyUI's custom_nodes/, without installing the package."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_nodes_reach_the_core_inside_the_plugin_folder():
    """An absolute ``diffbias_core`` import would need the package installed in ComfyUI's Python."""
    absolute = []
    for path in sorted((REPO / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            absolute += [
                f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "diffbias_core"
            ]
    assert absolute == [], absolute


def test_requirements_txt_lists_the_runtime_dependencies():
    """ComfyUI-Manager installs requirements.txt; it must match pyproject's dependencies (torch excluded)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = (REPO / "requirements.txt").read_text().splitlines()
    listed = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert sorted(listed) == sorted(declared)
    assert not any(re.match(r"torch\b", item) for item in listed)
