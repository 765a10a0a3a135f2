"""The core library stays pure torch: no ComfyUI imports, no import cycles, no pickle loading."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "diffbias_core"
FORBIDDEN = ("comfy", "folder_paths", "server", "nodes", "execution", "comfy_api")


def core_modules() -> dict[str, Path]:
    """Every module of the core: dotted name -> file (packages by their ``__init__.py``)."""
    modules = {}
    for path in sorted(CORE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the core modules it imports, anywhere in the file (function-level imports included).

    ``from .x import y`` counts ``x`` and, when ``y`` is a module, ``x.y``; the implicit import of a parent
    package is not an edge.
    """
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_every_core_module_imports_without_comfyui():
    names = sorted(core_modules())
    assert len(names) > 40 and "diffbias_core.sae.model" in names and "diffbias_core.toy.demo" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(len([m for m in sys.modules if m.startswith('diffbias_core')]), ','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    loaded, bad = (
        result.stdout.strip().split(" ", 1) if " " in result.stdout.strip() else (result.stdout.strip(), "")
    )
    assert int(loaded) >= len(names)
    assert bad == "", f"diffbias_core imported {bad}"


def test_the_core_has_no_import_cycle():
    edges = import_edges(core_modules())
    assert "diffbias_core.sae.model" in edges["diffbias_core.sae.formats"]  # the graph sees the imports
    assert "diffbias_core.dissect.train_state" in edges["diffbias_core.dissect.train"]
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


STAGE_ORDER = ("base", "sae", "dissect", "attribute", "intervene", "measure", "cli", "toy")
"""The stages from the bottom up: a module imports only from its own stage or one below (the package's own
``__init__`` and ``__main__``, above them all, re-export and dispatch)."""


def _stage(module: str) -> int:
    parts = module.split(".")
    return STAGE_ORDER.index(parts[1]) if len(parts) > 1 and parts[1] in STAGE_ORDER else len(STAGE_ORDER)


def test_stages_import_only_downwards():
    edges = import_edges(core_modules())
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if _stage(b) > _stage(a))
    assert upward == []


def test_the_cycle_finder_finds_a_lazy_import_cycle(tmp_path, monkeypatch):
    """The check above can fail: a function-level import that closes a loop is reported with its path."""
    package = tmp_path / "diffbias_core"
    (package / "a").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a" / "__init__.py").write_text("")
    (package / "a" / "one.py").write_text("from . import two\n")
    (package / "a" / "two.py").write_text("def f():\n    from ..a.one import g\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "CORE", package)
    cycle = find_cycle(import_edges(core_modules()))
    assert cycle == ["diffbias_core.a.one", "diffbias_core.a.two", "diffbias_core.a.one"]


_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unsafe_loads(source: str) -> list[str]:
    """Calls and imports in ``source`` that can unpickle: ``torch.load``, ``torch.serialization``, the pickle
    family of modules, and ``allow_pickle=True``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names += (
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            )
            found += [f"line {node.lineno}: import {n}" for n in names
                      if n.split(".")[0] in _PICKLE_MODULES or n in ("torch.load", "torch.serialization")]  # fmt: skip
        elif (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch"
        ):
            if node.attr in ("load", "serialization"):
                found.append(f"line {node.lineno}: torch.{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                found.append(f"line {node.value.lineno}: allow_pickle")
    return sorted(found, key=lambda hit: (int(hit.split(":")[0].split()[1]), hit))


def test_no_core_module_can_unpickle():
    hits = {
        str(path.relative_to(ROOT)): unsafe_loads(path.read_text(encoding="utf-8"))
        for path in core_modules().values()
    }
    assert {path: found for path, found in hits.items() if found} == {}


def test_the_unpickling_scan_flags_each_way_in():
    torch_call, pickle_mod = "torch." + "load", "pick" + "le"  # composed: the scan of this file finds nothing
    source = (
        f"import torch\nimport {pickle_mod}\nfrom joblib import load\n"
        f"w = {torch_call}('x')\nv = torch.serialization\nnp.load('x', allow_pickle=True)\n"
        "np.load('y', allow_pickle=False)\n"
    )
    assert unsafe_loads(source) == [
        f"line 2: import {pickle_mod}",
        "line 3: import joblib",
        "line 3: import joblib.load",
        "line 4: torch.load",
        "line 5: torch.serialization",
        "line 6: allow_pickle",
    ]


def test_ruff_flags_a_pickle_load_in_the_core(tmp_path):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    sample = ROOT / "diffbias_core" / "_boundary_probe.py"
    probe = tmp_path / "probe.py"
    torch_call, pickle_call = "torch." + "load", "pickle." + "loads"  # composed: a grep finds no such call
    probe.write_text(
        f"import pickle\n\nimport torch\n\n\ndef f(p):\n    return {torch_call}(p), {pickle_call}(b'')\n"
    )
    result = subprocess.run(
        [ruff, "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), "--stdin-filename", str(sample), "-"],
        input=probe.read_text(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "TID251" in result.stdout and "torch.load" in result.stdout and "pickle" in result.stdout
