"""Draw a ComfyUI UI-format workflow as a PNG node diagram with Pillow (for the README).

    python docs/render_workflow.py example_workflows/debiased_txt2img.json docs/debiased_txt2img.png \
        [--object-info object_info.json]

With ``--object-info`` (a saved ``GET /object_info``) nodes show display names and widget names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HEADER, ROW, PAD, WIDTH = 26, 18, 10, 300
COLOURS = {
    "MODEL": (180, 160, 255),
    "CLIP": (255, 210, 80),
    "VAE": (255, 110, 110),
    "CONDITIONING": (255, 170, 60),
    "LATENT": (255, 150, 200),
    "IMAGE": (100, 180, 255),
    "DIFFBIAS_SAE": (90, 210, 140),
    "DIFFBIAS_FEATURES": (60, 200, 220),
    "STRING": (170, 200, 120),
    "INT": (170, 200, 120),
}
BG, NODE, OURS, INK, DIM = (32, 33, 36), (53, 54, 58), (40, 70, 62), (235, 235, 235), (165, 165, 170)


def font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def widget_rows(node: dict, info: dict | None) -> list[str]:
    values = [v for v in node.get("widgets_values") or [] if v not in ("fixed", "randomize")]
    names: list[str] = []
    if info:
        order = info.get("input_order", {})
        names = [
            n
            for g in ("required", "optional")
            for n in order.get(g, [])
            if isinstance(info["input"][g][n][0], list)
            or info["input"][g][n][0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
        ]
    rows = []
    for i, value in enumerate(values):
        text = str(value).replace("\n", " / ")
        text = text if len(text) <= 34 else text[:33] + "…"
        rows.append(f"{names[i]}: {text}" if i < len(names) else text)
    return rows


def layout(workflow: dict, object_info: dict) -> dict[int, dict]:
    boxes = {}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        inputs = [slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None]
        outputs = [slot["name"] for slot in node.get("outputs", [])]
        widgets = widget_rows(node, info)
        height = HEADER + PAD + ROW * (max(len(inputs), len(outputs)) + len(widgets)) + PAD
        title = node.get("title") or (info or {}).get("display_name") or node["type"]
        boxes[node["id"]] = {
            "x": node["pos"][0],
            "y": node["pos"][1],
            "h": height,
            "title": title,
            "inputs": inputs,
            "outputs": outputs,
            "widgets": widgets,
            "node": node,
        }
    return boxes


def render(workflow: dict, object_info: dict, out: Path, scale: float = 1.0) -> None:
    boxes = layout(workflow, object_info)
    left = min(b["x"] for b in boxes.values()) - 30
    top = min(b["y"] for b in boxes.values()) - 30
    right = max(b["x"] + WIDTH for b in boxes.values()) + 30
    bottom = max(b["y"] + b["h"] for b in boxes.values()) + 30
    image = Image.new("RGB", (int(right - left), int(bottom - top)), BG)
    draw = ImageDraw.Draw(image)
    title_font, text_font = font(14), font(12)

    def slot_y(box: dict, index: int) -> float:
        return box["y"] - top + HEADER + PAD + ROW * index + ROW / 2

    for link in workflow["links"]:
        _, origin, origin_slot, target, target_slot, kind = link
        a, b = boxes[origin], boxes[target]
        linked_inputs = [s for s in b["node"].get("inputs", []) if s.get("link") is not None]
        index = next(i for i, s in enumerate(linked_inputs) if s["link"] == link[0])
        start = (a["x"] - left + WIDTH, slot_y(a, origin_slot))
        end = (b["x"] - left, slot_y(b, index))
        bend = max(40.0, (end[0] - start[0]) / 2)
        points = [
            (
                start[0] + (end[0] - start[0]) * t + bend * 3 * t * (1 - t) * (1 - 2 * t),
                start[1] + (end[1] - start[1]) * (3 * t * t - 2 * t * t * t),
            )
            for t in [i / 24 for i in range(25)]
        ]
        draw.line(points, fill=COLOURS.get(kind, DIM), width=3)
    for box in boxes.values():
        x, y = box["x"] - left, box["y"] - top
        ours = box["node"]["type"].startswith("DiffBias")
        draw.rounded_rectangle(
            (x, y, x + WIDTH, y + box["h"]),
            radius=8,
            fill=OURS if ours else NODE,
            outline=(90, 200, 150) if ours else (80, 80, 86),
            width=2,
        )
        draw.text((x + PAD, y + 5), box["title"], fill=INK, font=title_font)
        for i, name in enumerate(box["inputs"]):
            kind = next(s["type"] for s in box["node"]["inputs"] if s["name"] == name)
            cy = slot_y(box, i)
            draw.ellipse((x - 5, cy - 5, x + 5, cy + 5), fill=COLOURS.get(kind, DIM))
            draw.text((x + PAD, cy - 7), name, fill=DIM, font=text_font)
        for i, name in enumerate(box["outputs"]):
            kind = box["node"]["outputs"][i]["type"]
            cy = slot_y(box, i)
            draw.ellipse((x + WIDTH - 5, cy - 5, x + WIDTH + 5, cy + 5), fill=COLOURS.get(kind, DIM))
            width = draw.textlength(name, font=text_font)
            draw.text((x + WIDTH - PAD - width, cy - 7), name, fill=DIM, font=text_font)
        first = max(len(box["inputs"]), len(box["outputs"]))
        for j, text in enumerate(box["widgets"]):
            draw.text((x + PAD, slot_y(box, first + j) - 7), text, fill=INK, font=text_font)
    if scale != 1.0:
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.LANCZOS)
    image.save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--object-info", type=Path)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    info = json.loads(args.object_info.read_text()) if args.object_info else {}
    render(json.loads(args.workflow.read_text()), info, args.out, args.scale)


if __name__ == "__main__":
    main()
