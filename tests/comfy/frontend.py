"""Drive ComfyUI's real frontend (the page ``comfyui-frontend-package`` serves) in headless Chromium.

Facts this module relies on, measured on frontend 1.27.10:
- ``window.app`` is the ComfyApp (the same object as ``window.comfyAPI.app.app``); ``app.graph`` is the
  LiteGraph graph, ``app.graphToPrompt()`` the API prompt, ``app.extensionManager.command.execute(id)`` runs a
  command and ``app.extensionManager.setting`` reads and writes settings.
- The template browser opens from the sidebar button ``.templates-tab-button``; it is a ``role=dialog`` whose left
  list (``role=option``) names each plugin's folder under "Custom Nodes" (pages narrower than about 1280 px fold
  that list away); a card is ``data-testid=template-workflow-<name>``, its thumbnail
  ``/api/workflow_templates/<folder>/<name>.jpg``. Clicking a card loads the workflow and closes the dialog.
- A first visit (setting ``Comfy.TutorialCompleted`` unset) opens the template browser by itself on a blank graph.
- Widgets: ``node.widgets`` in ``widgets_values`` order, each with ``name``, ``value``, ``callback`` and
  ``options.values`` (combos) / ``options.min``, ``options.max`` (numbers).
- The Run button is ``data-testid=queue-button``; it POSTs ``/api/prompt``.
- A workflow with unknown node types opens a "Some Nodes Are Missing" dialog.
- The page asks api.comfy.org for release notes and node packs: every request not to the server is aborted.

Used by test_frontend.py and make_thumbnails.py; imports nothing of this folder so that both can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM_ENV = "DIFFBIAS_CHROMIUM"
"""Environment variable naming a Chromium binary; else one of BINARIES on PATH is used."""
BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
REPORT_KINDS = ("error", "warning")
"""Console message types recorded as reports (with page errors)."""


def find_chromium() -> tuple[str | None, str]:
    """(path of a Chromium binary and Playwright, or None; the reason when None)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "the Python package playwright is not installed (pip install playwright==1.65.2)"
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        if Path(explicit).is_file():
            return explicit, ""
        return None, f"{CHROMIUM_ENV}={explicit} is not a file"
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found, ""
    return None, (
        f"no Chromium found: none of {', '.join(BINARIES)} is on PATH and {CHROMIUM_ENV} is not set "
        "(Debian: apt-get install chromium)"
    )


FIRST_VISIT_DONE = {"Comfy.TutorialCompleted": True}
"""Settings of a user who has opened the page before (a first visit opens the template browser by itself)."""


def store_settings(url: str, settings: dict[str, Any]) -> None:
    """Write frontend settings for the server's default user (POST /settings)."""
    request = urllib.request.Request(
        url.rstrip("/") + "/settings",
        data=json.dumps(settings).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


class Frontend:
    """One fresh page (own browser context) on a ComfyUI server; records console errors and page errors."""

    def __init__(self, browser, url: str, viewport: tuple[int, int] = (1600, 1000)) -> None:
        self.url = url.rstrip("/")
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.reports: list[str] = []
        """Console errors and warnings and uncaught page errors, the server's address replaced by <server>."""
        self.blocked: list[str] = []
        """Requests aborted because they were not to the server."""
        self.page.route("**/*", self._route)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self._report(f"pageerror: {error}"))

    def _route(self, route) -> None:
        if route.request.url.startswith(self.url + "/") or route.request.url == self.url:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def _console(self, message) -> None:
        if message.type in REPORT_KINDS:
            self._report(f"console.{message.type}: {message.text}")

    def _report(self, text: str) -> None:
        self.reports.append(normalize(text, self.url))

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, timeout_ms: float = 90_000) -> None:
        """Load the page and wait until the app has registered the server's nodes and drawn its first graph."""
        self.page.goto(self.url + "/")
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.app.extensionManager"
            " && Object.keys(LiteGraph.registered_node_types).length > 0 && !window.app.configuringGraph",
            timeout=timeout_ms,
        )
        self.page.get_by_test_id("queue-button").wait_for()

    def evaluate(self, script: str, arg: Any = None) -> Any:
        return self.page.evaluate(script, arg)

    def open_templates(self):
        """Open the template browser from the sidebar; returns the dialog locator."""
        dialog = self.page.get_by_role("dialog").filter(
            has=self.page.get_by_test_id("template-workflows-content")
        )
        if not dialog.count():
            self.page.locator(".templates-tab-button").click()
        dialog.wait_for()
        return dialog

    def close_dialogs(self) -> None:
        while self.page.get_by_role("dialog").count():
            self.page.keyboard.press("Escape")
            self.page.get_by_role("dialog").last.wait_for(state="detached", timeout=5_000)

    def template_names(self, category: str) -> list[str]:
        """Card names the template browser shows under ``category`` (a plugin folder name)."""
        dialog = self.open_templates()
        dialog.get_by_role("option", name=category, exact=True).click()
        cards = dialog.locator("[data-testid^='template-workflow-']")
        cards.first.wait_for()
        return [card.get_attribute("data-testid").removeprefix("template-workflow-") for card in cards.all()]

    def load_template(self, category: str, name: str, nodes: int, timeout_ms: float = 30_000) -> None:
        """Load a workflow as a user does: template browser, ``category``, click the card ``name``; waits until
        the graph holds ``nodes`` nodes and the dialog is closed."""
        dialog = self.open_templates()
        dialog.get_by_role("option", name=category, exact=True).click()
        dialog.get_by_test_id(f"template-workflow-{name}").click()
        dialog.wait_for(state="detached", timeout=timeout_ms)
        self.page.wait_for_function(
            "(n) => app.graph.nodes.length === n && !app.configuringGraph", arg=nodes, timeout=timeout_ms
        )

    def thumbnail_sizes(self, category: str, timeout_ms: float = 15_000) -> dict[str, tuple[int, int]]:
        """Natural size of each card's thumbnail in the template browser, (0, 0) for a card whose image has not
        loaded within ``timeout_ms`` (the page fetches them one by one after the cards are drawn)."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        dialog = self.open_templates()
        dialog.get_by_role("option", name=category, exact=True).click()
        dialog.locator("[data-testid^='template-workflow-']").first.wait_for()
        with contextlib.suppress(PlaywrightTimeout):
            self.page.wait_for_function(
                "() => [...document.querySelectorAll(\"[data-testid^='template-workflow-'] img\")]"
                ".every(img => img.naturalWidth > 0)",
                timeout=timeout_ms,
            )
        return {
            name: tuple(size)
            for name, size in self.evaluate(
                """() => [...document.querySelectorAll("[data-testid^='template-workflow-']")].map(card => [
                    card.dataset.testid.replace('template-workflow-', ''),
                    [card.querySelector('img')?.naturalWidth ?? 0, card.querySelector('img')?.naturalHeight ?? 0]])"""
            )
        }

    def open_dialogs(self) -> list[str]:
        """Texts of the dialogs open now (missing nodes, load errors, prompt errors)."""
        return self.evaluate("() => [...document.querySelectorAll('[role=dialog]')].map(d => d.innerText)")

    def error_toasts(self) -> list[str]:
        return self.evaluate(
            "() => [...document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')]"
            ".map(t => t.innerText)"
        )

    def widgets(self) -> dict[str, list[dict]]:
        """Per node id: the widgets a saved workflow stores, in order, each {name, type, value, options (combo),
        min, max}. Display-only widgets that the frontend never saves (``serialize === false``, e.g. Preview
        Any's ``preview`` text) are left out, as they are from the file's ``widgets_values``."""
        return self.evaluate(
            """() => Object.fromEntries(app.graph.nodes.map(node => [String(node.id),
                (node.widgets ?? []).filter(w => w.serialize !== false).map(w => {
                const values = w.options?.values;
                return {name: w.name, type: w.type, value: w.value,
                        options: typeof values === 'function' ? values() : (values ?? null),
                        min: w.options?.min ?? null, max: w.options?.max ?? null};
            })]))"""
        )

    def set_widgets(self, changes: dict[str, dict[str, Any]]) -> None:
        """Set widget values through the page's widgets (value, then the widget's callback, as an edit does);
        ``changes``: node id -> widget name -> value. Raises naming a node or widget the page lacks."""
        missing = self.evaluate(
            """(changes) => {
                const missing = [];
                for (const [id, values] of Object.entries(changes)) {
                    const node = app.graph.getNodeById(Number(id));
                    if (!node) { missing.push(`node ${id}`); continue; }
                    for (const [name, value] of Object.entries(values)) {
                        const widget = node.widgets?.find(w => w.name === name);
                        if (!widget) { missing.push(`node ${id} (${node.type}) widget ${name}`); continue; }
                        widget.value = value;
                        widget.callback?.(widget.value, app.canvas, node);
                    }
                }
                app.graph.setDirtyCanvas(true, true);
                return missing;
            }""",
            changes,
        )
        if missing:
            raise KeyError(f"the page has no {', '.join(missing)}")

    def graph_to_prompt(self) -> dict[str, dict]:
        """``(await app.graphToPrompt()).output`` without the frontend's ``_meta`` (titles)."""
        return strip_meta(self.evaluate("async () => (await app.graphToPrompt()).output"))

    def queue(self) -> tuple[int, dict, dict]:
        """Click Run; returns (HTTP status, the server's answer, the prompt the page sent, without ``_meta``)."""
        with self.page.expect_response(
            lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST"
        ) as info:
            self.page.get_by_test_id("queue-button").click()
        response = info.value
        sent = response.request.post_data_json or {}
        return response.status, response.json(), strip_meta(sent.get("prompt", {}))

    def graph_bounds(self) -> list[float]:
        """[x, y, width, height] of the box around every node, titles included (graph units)."""
        return self.evaluate(
            """() => {
                const rects = app.graph.nodes.map(node => node.boundingRect);
                const left = Math.min(...rects.map(r => r[0])), top = Math.min(...rects.map(r => r[1]));
                const right = Math.max(...rects.map(r => r[0] + r[2]));
                const bottom = Math.max(...rects.map(r => r[1] + r[3]));
                return [left, top, right - left, bottom - top];
            }"""
        )

    def fit_view(self, fill: float = 0.95) -> None:
        """Zoom and pan so that every node fills ``fill`` of the canvas's tighter side (the frontend's own
        "fit view" command leaves a quarter of it empty)."""
        self.evaluate(
            """([bounds, fill]) => {
                app.canvas.ds.fitToBounds(bounds, {zoom: fill});
                app.canvas.setDirty(true, true);
            }""",
            [self.graph_bounds(), fill],
        )
        self.page.wait_for_timeout(300)

    def overlaps(self) -> list[str]:
        """Pairs of nodes whose drawn boxes (title included, at the size the frontend gives them) overlap."""
        return self.evaluate(
            """() => {
                const nodes = app.graph.nodes, found = [];
                for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
                    const [a, b] = [nodes[i].boundingRect, nodes[j].boundingRect];
                    const dx = Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]);
                    const dy = Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]);
                    if (dx > 0 && dy > 0) found.push(`${nodes[i].id} ${nodes[i].type} and ${nodes[j].id} ${nodes[j].type}: `
                        + `${Math.round(dx)} x ${Math.round(dy)} px (drawn heights ${Math.round(a[3])}, ${Math.round(b[3])})`);
                }
                return found;
            }"""
        )

    def screenshot(self, path: Path, quality: int | None = None, hide: tuple[str, ...] = ()) -> Path:
        """Write a screenshot of the page, elements matching the CSS selectors ``hide`` hidden; JPEG when
        ``quality`` is given, else PNG."""
        path.parent.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {"type": "jpeg", "quality": quality} if quality is not None else {}
        if hide:
            options["style"] = f"{', '.join(hide)} {{ visibility: hidden !important; }}"
        self.page.screenshot(path=str(path), **options)
        return path


UI_OVER_CANVAS = (
    ".comfy-menu-hamburger",
    '.p-buttongroup-vertical:has([data-testid="zoom-controls-button"])',
)
"""What focus mode leaves over the canvas: the menu button and the zoom controls."""


def strip_meta(prompt: dict[str, dict]) -> dict[str, dict]:
    return {key: {k: v for k, v in node.items() if k != "_meta"} for key, node in prompt.items()}


def normalize(text: str, url: str) -> str:
    """A report with the server's address replaced, so that the reports of two servers compare."""
    return re.sub(r"127\.0\.0\.1:\d+", "<server>", text.replace(url, "<server>"))
