"""Run the tests of ``tests/comfy/inside/`` in a child pytest session inside a ComfyUI process.

The parent session (the README's ``python -m pytest``) never imports ComfyUI: it collects the test
functions of this folder as usual and replaces each by a :class:`ChildResult` item. The first of them to
run starts one child pytest session for every selected one (cwd = ComfyUI, the torchvision stub and
ComfyUI on ``PYTHONPATH``, ``DIFFBIAS_INSIDE_COMFYUI=1``); the child writes one JSON line per test phase,
and each parent item reports its own test's outcome with the child's full failure text. ComfyUI's
``sys.path`` edits, its global state and the loaded models stay in the child; the core tests in the parent
see none of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ..comfy_server import REPO, comfy_env

CHILD_ENV = "DIFFBIAS_INSIDE_COMFYUI"
"""Set to 1 in the child session: the folder's conftest then imports ComfyUI and provides the fixtures."""
REPORT_ENV = "DIFFBIAS_INSIDE_REPORT"
"""Path of the JSON-lines file the child writes its test reports to."""
CHILD_TIMEOUT_S = 1800.0
"""Wall-clock limit of one child session."""

_RESULTS = pytest.StashKey[dict]()


def in_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


class ChildFailure(Exception):
    """A test failed (or the child session broke) in the ComfyUI process; the text says how."""


class ChildResult(pytest.Item):
    """Stands in the parent session for one test that runs in the child session."""

    def __init__(self, *, location: tuple, **kwargs) -> None:
        super().__init__(**kwargs)
        self._location = location

    def reportinfo(self):
        return self._location

    def runtest(self) -> None:
        phases = child_results(self.session).get(self.nodeid)
        if phases is None:
            raise ChildFailure(
                f"the child session reported nothing for {self.nodeid}\n{child_results(self.session)['']}"
            )
        for phase in phases:
            for title, text in phase["sections"]:
                self.add_report_section(phase["when"], f"child {title}", text)
        for phase in phases:
            if phase["outcome"] == "failed":
                raise ChildFailure(f"{phase['message']} [{phase['when']}, in ComfyUI]\n{phase['longrepr']}")
        for phase in phases:
            if phase["outcome"] == "skipped":
                pytest.skip(phase["longrepr"])

    def child_duration(self, when: str) -> float | None:
        """Seconds the child spent in phase ``when`` of this test (None before the child ran)."""
        results = self.session.config.stash.get(_RESULTS, {})
        return next((p["duration"] for p in results.get(self.nodeid, ()) if p["when"] == when), None)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ChildFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)


def make_proxies(collector, items):
    """Each pytest.Function among ``items`` (collected in the parent) becomes a :class:`ChildResult`."""
    out = []
    for item in items if isinstance(items, list) else [items]:
        if not isinstance(item, pytest.Function):
            out.append(item)
            continue
        path, lineno, name = item.reportinfo()
        proxy = ChildResult.from_parent(collector, name=item.name, location=(path, lineno, name))
        proxy.own_markers = list(item.own_markers)
        proxy.keywords.update(item.keywords)
        out.append(proxy)
    return out


def child_results(session: pytest.Session) -> dict:
    """Per node id, the child's phase reports for every selected ChildResult (run once per session).

    The key "" holds a description of the child run (command, exit status, output tail) for messages.
    """
    results = session.config.stash.get(_RESULTS, None)
    if results is None:
        selected = [item.nodeid for item in session.items if isinstance(item, ChildResult)]
        results = run_child(selected)
        session.config.stash[_RESULTS] = results
    return results


def run_child(nodeids: list[str]) -> dict:
    comfyui = os.environ["COMFYUI_PATH"]
    folder = Path(tempfile.mkdtemp(prefix="diffbias_inside_"))
    report, log = folder / "reports.jsonl", folder / "child.log"
    env = comfy_env(comfyui)
    env[CHILD_ENV], env[REPORT_ENV] = "1", str(report)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(REPO / "pyproject.toml"),
        "--rootdir",
        str(REPO),
        "-p",
        "no:cacheprovider",
        "-q",
        *[str(REPO / nodeid) for nodeid in nodeids],
    ]
    with open(log, "wb") as out:
        try:
            code = subprocess.run(
                command, cwd=comfyui, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT_S
            ).returncode
        except subprocess.TimeoutExpired:
            code = f"killed after {CHILD_TIMEOUT_S:.0f} s"
    results: dict = {}
    if report.is_file():
        for line in report.read_text().splitlines():
            phase = json.loads(line)
            results.setdefault(phase["nodeid"], []).append(phase)
    tail = log.read_text(errors="replace")[-6000:]
    results[""] = (
        f"child session: {' '.join(command)}\n(cwd {comfyui}) exit status {code}; output tail:\n{tail}"
    )
    if code in (0, 1):  # 0: all passed, 1: some failed (reported per test); otherwise keep the log
        shutil.rmtree(folder, ignore_errors=True)
    return results


def write_report(report: pytest.TestReport) -> None:
    """Child side: append one phase report to the file the parent reads."""
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple):
        text = longrepr[2]
    else:
        text = "" if longrepr is None else str(longrepr)
    crash = getattr(getattr(longrepr, "reprcrash", None), "message", "") or text
    phase = {
        "message": (crash.splitlines() or [""])[0],
        "nodeid": report.nodeid,
        "when": report.when,
        "duration": report.duration,
        "outcome": report.outcome,
        "longrepr": text,
        "sections": [list(section) for section in report.sections if report.outcome != "passed"],
    }
    with open(os.environ[REPORT_ENV], "a", encoding="utf-8") as out:
        out.write(json.dumps(phase) + "\n")
