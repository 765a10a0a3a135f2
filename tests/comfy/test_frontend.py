"""The example workflows in ComfyUI's real frontend, in headless Chromium, as a user opens and runs them.

For every file in example_workflows/: loaded from the template browser (category = the plugin's folder name,
then the card); no dialog (missing nodes, load error), no error toast, no console error or page error that the
same page of a ComfyUI without the plugin does not also show; every widget holds the value the file stores,
within its range or list; ``app.graphToPrompt()`` equals the tests' converter; then shrunk through the page's
widgets (TINY of test_workflows), queued with the Run button and run to success. A failing case leaves a
screenshot in the test's tmp_path (its path is printed).

Needs Chromium (Debian's ``chromium``, or ``DIFFBIAS_CHROMIUM=/path``) and the Python package playwright:
without them the tests skip with the reason, except when the environment variable CI is set (then they fail).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import pytest

from .comfy_server import ComfyServer, execution_error
from .conftest import NO_CHROMIUM_PREFIX
from .frontend import FIRST_VISIT_DONE, Frontend, find_chromium, store_settings
from .test_workflows import EXAMPLES, TINY, tiny
from .workflows import ui_to_api

CATEGORY = "diffbias"
"""The plugin's folder name in the test server's custom_nodes: the template browser's category."""


@pytest.fixture(scope="session")
def chromium(comfyui) -> str:
    """The Chromium binary; found before any server starts, so that a machine without one skips at once."""
    path, reason = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI (CI is set), but {reason}")
        pytest.skip(NO_CHROMIUM_PREFIX + reason)
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def baseline(comfyui, browser, tmp_path_factory) -> set[str]:
    """Reports of the same page on a ComfyUI without the plugin: opened, template browser opened and closed."""
    base = tmp_path_factory.mktemp("bare_base")
    (base / "custom_nodes").mkdir()
    bare = ComfyServer(comfyui, base, tmp_path_factory.mktemp("bare_log") / "server.log")
    try:
        bare.wait_ready()
        store_settings(bare.url, FIRST_VISIT_DONE)
        with Frontend(browser, bare.url) as page:
            page.open()
            page.open_templates()
            page.close_dialogs()
            page.page.wait_for_load_state("networkidle")
            return set(page.reports)
    finally:
        bare.stop()


@pytest.fixture(scope="module")
def frontend_server(chromium, server, sd15_checkpoint):
    """The session server, with the checkpoint names the examples store present (linked to the random one),
    so that every combo value of a file is one the page can offer."""
    folder = Path(server.base) / "models" / "checkpoints"
    for path in EXAMPLES:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "CheckpointLoaderSimple" and not (folder / node["widgets_values"][0]).exists():
                (folder / node["widgets_values"][0]).symlink_to(sd15_checkpoint)
    store_settings(server.url, FIRST_VISIT_DONE)
    return server


@contextlib.contextmanager
def screenshot_on_failure(page: Frontend, path: Path):
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path)
            print(f"screenshot of the failing page: {path}")
        raise


def widget_problems(workflow: dict, widgets: dict[str, list[dict]]) -> list[str]:
    """Where the page's widgets differ from the values the file stores, or hold a value outside their range."""
    problems = []
    for node in workflow["nodes"]:
        label = f"node {node['id']} ({node['type']})"
        page_widgets = widgets.get(str(node["id"]))
        if page_widgets is None:
            problems.append(f"{label}: not in the page's graph")
            continue
        stored = list(node.get("widgets_values") or [])
        if len(stored) != len(page_widgets):
            names = [widget["name"] for widget in page_widgets]
            problems.append(
                f"{label}: the page has {len(names)} widgets {names}, the file stores {len(stored)} values"
            )
        for widget, value in zip(page_widgets, stored, strict=False):
            shown = widget["value"]
            same = (
                math.isclose(shown, value, rel_tol=1e-9, abs_tol=1e-12)
                if isinstance(shown, (int, float)) and isinstance(value, (int, float))
                else shown == value
            )
            if not same:
                problems.append(
                    f"{label} widget {widget['name']}: file stores {value!r}, the page holds {shown!r}"
                )
            if widget["options"] is not None and shown not in widget["options"]:
                problems.append(
                    f"{label} widget {widget['name']}: {shown!r} is not one of {widget['options']}"
                )
            if isinstance(shown, (int, float)) and not isinstance(shown, bool):
                low, high = widget["min"], widget["max"]
                if (low is not None and shown < low) or (high is not None and shown > high):
                    problems.append(f"{label} widget {widget['name']}: {shown!r} outside [{low}, {high}]")
    return problems


def shrink(workflow: dict) -> dict[str, dict]:
    """Widget changes (node id -> name -> value) that make a workflow tiny: test_workflows' TINY by node type."""
    return {str(node["id"]): TINY[node["type"]] for node in workflow["nodes"] if node["type"] in TINY}


def wait_history(server, prompt_id: str, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} queued by the page did not finish within {timeout} s")


def test_template_browser_lists_every_example_with_its_thumbnail(
    frontend_server, browser, baseline, tmp_path
):
    with (
        Frontend(browser, frontend_server.url) as page,
        screenshot_on_failure(page, tmp_path / "templates.png"),
    ):
        page.open()
        assert sorted(page.template_names(CATEGORY)) == sorted(path.stem for path in EXAMPLES)
        sizes = page.thumbnail_sizes(CATEGORY)
        blank = [name for name, size in sizes.items() if min(size) == 0]
        assert not blank, f"template cards without a thumbnail (example_workflows/<name>.jpg): {blank}"
        new = sorted(set(page.reports) - baseline)
        assert not new, (
            f"the template browser of the plugin's server reports what a bare ComfyUI does not: {new}"
        )


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_in_the_frontend(frontend_server, browser, baseline, path, tmp_path):
    workflow = json.loads(path.read_text())
    object_info = frontend_server.get("/object_info")
    with (
        Frontend(browser, frontend_server.url) as page,
        screenshot_on_failure(page, tmp_path / f"{path.stem}.png"),
    ):
        page.open()
        page.load_template(CATEGORY, path.stem, nodes=len(workflow["nodes"]))
        assert not page.open_dialogs(), f"dialogs after loading {path.name}: {page.open_dialogs()}"
        assert not page.error_toasts(), f"error toasts after loading {path.name}: {page.error_toasts()}"
        problems = widget_problems(workflow, page.widgets())
        assert not problems, f"{path.name} in the page:\n" + "\n".join(problems)

        assert page.graph_to_prompt() == ui_to_api(workflow, object_info)

        page.set_widgets(shrink(workflow))
        status, answer, sent = page.queue()
        assert status == 200 and not answer.get("node_errors"), (
            f"the server refused the page's prompt: {answer}"
        )
        assert sent == tiny(ui_to_api(workflow, object_info)), (
            "the page queued another prompt than the shrunk file"
        )
        entry = wait_history(frontend_server, answer["prompt_id"])
        error = execution_error(entry)
        assert error is None, (
            f"{error.get('exception_message')}\n{''.join(error.get('traceback', []))[-3000:]}"
        )
        assert entry["status"]["status_str"] == "success"
        page.page.wait_for_function("() => !app.runningNodeId", timeout=30_000)
        assert not page.open_dialogs(), f"dialogs after running {path.name}: {page.open_dialogs()}"
        new = sorted(set(page.reports) - baseline)
        assert not new, f"{path.name}: the page reports what the same page of a bare ComfyUI does not: {new}"


def test_the_checks_see_a_broken_workflow(frontend_server, browser, tmp_path):
    """The checks above can fail: an unknown node type, a missing widget value and a value outside a combo."""
    workflow = json.loads(EXAMPLES[0].read_text())
    broken = json.loads(json.dumps(workflow))
    by_type = {node["type"]: node for node in broken["nodes"]}
    by_type["DiffBiasLoadSAE"]["type"] = "DiffBiasNoSuchNode"
    by_type["DiffBiasApplyIntervention"]["widgets_values"].pop()
    by_type["KSampler"]["widgets_values"][4] = "no_such_sampler"
    with Frontend(browser, frontend_server.url) as page, screenshot_on_failure(page, tmp_path / "broken.png"):
        page.open()
        page.evaluate("(graph) => app.loadGraphData(graph)", broken)
        page.page.get_by_role("dialog").wait_for()
        assert any("DiffBiasNoSuchNode" in text for text in page.open_dialogs())
        problems = "\n".join(widget_problems(broken, page.widgets()))
        intervention = by_type["DiffBiasApplyIntervention"]["id"]
        sampler = by_type["KSampler"]["id"]
        assert f"node {intervention} (DiffBiasApplyIntervention): the page has 9 widgets" in problems
        assert f"node {sampler} (KSampler) widget sampler_name: 'no_such_sampler' is not one of" in problems
