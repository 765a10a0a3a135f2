"""Screenshots of the example workflows in ComfyUI's real frontend: template-browser thumbnails and README pictures.

    COMFYUI_PATH=/path/to/ComfyUI python tests/comfy/make_thumbnails.py [--docs] [--only NAME ...]

Starts a headless ComfyUI (CPU, loopback) with this plugin in a temporary base directory, opens each
``example_workflows/<name>.json`` from the template browser in headless Chromium (Debian's ``chromium`` or
``DIFFBIAS_CHROMIUM``; see frontend.py), hides the UI around the canvas, fits the view to the nodes and writes
``example_workflows/<name>.jpg`` (the template browser shows it on the workflow's card). ``--docs`` also writes
``docs/<name>.png`` at a larger size for the README.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from comfy_server import REPO, ComfyServer
from frontend import FIRST_VISIT_DONE, UI_OVER_CANVAS, Frontend, find_chromium, store_settings

LOG = logging.getLogger("make_thumbnails")
EXAMPLES = REPO / "example_workflows"
DOCS = REPO / "docs"
CATEGORY = "diffbias"
PICTURE_SETTINGS = {
    **FIRST_VISIT_DONE,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.NodeBadge.NodeSourceBadgeMode": "None",
    # Fitting a wide workflow zooms out below the default 0.6, where the canvas stops drawing text.
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
}
"""Frontend settings for the pictures: no minimap, canvas info or source badges; text drawn when zoomed out."""
THUMBNAIL = ((1024, 640), 80)
"""Viewport (width, height) and JPEG quality of a template-browser thumbnail."""
PICTURE = (1600, 500, 1000)
"""README picture (PNG): width, and the least and most height; the height follows the workflow's shape."""


def shoot(
    page: Frontend, name: str, nodes: int, viewport: tuple[int, ...], path: Path, quality: int | None
) -> Path:
    """Open the workflow from the template browser (at the page's full size: narrower pages fold the category
    list away), then shrink the page to ``viewport`` ((width, height), or (width, least height, most height):
    the height that gives the workflow's shape), hide the UI, fit the view and screenshot the canvas;
    logs the nodes that overlap."""
    page.open()
    page.load_template(CATEGORY, name, nodes)
    if len(viewport) == 3:
        width, low, high = viewport
        _, _, graph_width, graph_height = page.graph_bounds()
        viewport = (width, max(low, min(high, round(width * graph_height / graph_width))))
    page.page.set_viewport_size({"width": viewport[0], "height": viewport[1]})
    page.evaluate("() => app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
    page.evaluate("() => app.canvas.deselectAll?.()")
    page.fit_view()
    for overlap in page.overlaps():
        LOG.warning("%s: nodes overlap: %s", name, overlap)
    return page.screenshot(path, quality=quality, hide=UI_OVER_CANVAS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", action="store_true", help="also write docs/<name>.png for the README")
    parser.add_argument("--only", nargs="*", default=None, help="workflow names (default: every example)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfyui = os.environ.get("COMFYUI_PATH", "")
    if not (Path(comfyui) / "main.py").is_file():
        parser.error("set COMFYUI_PATH to a ComfyUI checkout (a folder with main.py)")
    chromium, reason = find_chromium()
    if chromium is None:
        parser.error(reason)
    workflows = sorted(EXAMPLES.glob("*.json"))
    if args.only is not None:
        workflows = [path for path in workflows if path.stem in args.only]

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="diffbias_thumbnails_") as temp:
        base = Path(temp)
        (base / "custom_nodes").mkdir()
        (base / "custom_nodes" / CATEGORY).symlink_to(REPO, target_is_directory=True)
        server = ComfyServer(comfyui, base, base / "server.log")
        try:
            server.wait_ready()
            store_settings(server.url, PICTURE_SETTINGS)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium)
                for path in workflows:
                    nodes = len(json.loads(path.read_text())["nodes"])
                    jobs = [(THUMBNAIL[0], path.with_suffix(".jpg"), THUMBNAIL[1])]
                    if args.docs:
                        jobs.append((PICTURE, DOCS / f"{path.stem}.png", None))
                    for viewport, out, quality in jobs:
                        with Frontend(browser, server.url) as page:
                            shoot(page, path.stem, nodes, viewport, out, quality)
                        LOG.info("wrote %s (%d bytes)", out.relative_to(REPO), out.stat().st_size)
                browser.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
