"""PNG outputs of the demo, drawn with Pillow: a grid of before/after twins and bar charts.

Pillow is a dependency of the package; where it is missing anyway, the pictures are skipped with a logged
message and the demo says they were not drawn.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .world import COLOURS, SHAPES

log = logging.getLogger(__name__)

RUN_LABELS = {
    "before": "before",
    "after": "after (SAE edit)",
    "random_features": "random features",
    "mean_difference": "mean difference",
    "prompting": "colour prompted",
}
_RGB = {"red": (220, 70, 70), "green": (60, 170, 80), "blue": (70, 100, 220)}


def _pillow():
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        log.warning("Pillow is not installed: skipping the PNG pictures (pip install pillow)")
        return None
    return Image, ImageDraw


def _save(image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def _to_uint8(images: Tensor, scale: int) -> Tensor:
    """(N, 3, S, S) in [-1, 1] -> (N, S*scale, S*scale, 3) uint8."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3)  # (N, 3, S*scale, S*scale)
    return pixels.permute(0, 2, 3, 1).contiguous()  # (N, H, W, 3)


def save_grid(
    images: dict[str, Tensor], shape: Tensor, path: Path, *, per_shape: int = 8, scale: int = 4
) -> bool:
    """Twins from the same noise: per shape, one row per run (before, after, controls), ``per_shape`` columns.

    images: run name -> (N, 3, S, S); shape: (N,). Returns False when Pillow is missing.
    """
    pil = _pillow()
    if pil is None:
        return False
    Image, ImageDraw = pil
    runs = [r for r in RUN_LABELS if r in images]
    side = next(iter(images.values())).shape[-1] * scale
    label_w, gap = 110, 6
    rows = len(SHAPES) * len(runs)
    canvas = Image.new(
        "RGB", (label_w + per_shape * (side + 2), rows * (side + 2) + len(SHAPES) * gap), "white"
    )
    draw = ImageDraw.Draw(canvas)
    y = 0
    for k, name in enumerate(SHAPES):
        picked = torch.nonzero(shape == k).flatten()[:per_shape]
        for run in runs:
            draw.text((4, y + side // 2 - 10), f"{name}\n{RUN_LABELS[run]}", fill="black")
            tiles = _to_uint8(images[run][picked], scale)
            for col, tile in enumerate(tiles):
                canvas.paste(Image.fromarray(tile.numpy()), (label_w + col * (side + 2), y))
            y += side + 2
        y += gap
    _save(canvas, path)
    return True


def save_charts(report: dict[str, Any], path: Path) -> bool:
    """Stacked colour proportions per shape and run, and FD per shape and run (with the 0.03 goal line)."""
    pil = _pillow()
    if pil is None:
        return False
    Image, ImageDraw = pil
    runs = [r for r in RUN_LABELS if r in report["runs"]]
    bar, group_gap, top, height = 22, 30, 40, 200
    width = 60 + len(SHAPES) * (len(runs) * (bar + 4) + group_gap)
    canvas = Image.new("RGB", (width, 2 * (height + top + 40) + 60), "white")
    draw = ImageDraw.Draw(canvas)
    for panel, title in enumerate(
        ("colour proportions (target 1/3 each)", "fairness discrepancy FD (goal <= 0.03)")
    ):
        y0 = panel * (height + top + 40) + top
        draw.text((10, y0 - 30), title, fill="black")
        draw.line([(50, y0 + height), (width - 10, y0 + height)], fill="black")
        x = 60
        fd_max = max([report["runs"][r]["per_shape"][s]["fd"] or 0 for r in runs for s in SHAPES] + [0.05])
        if panel == 0:
            third = y0 + height - height / 3
            draw.line([(50, third), (width - 10, third)], fill=(150, 150, 150))
        else:
            goal = y0 + height - height * 0.03 / fd_max
            draw.line([(50, goal), (width - 10, goal)], fill=(200, 0, 0))
        for s in SHAPES:
            draw.text((x, y0 + height + 18), s, fill="black")
            for i, run in enumerate(runs):
                figures = report["runs"][run]["per_shape"][s]
                left = x + i * (bar + 4)
                if panel == 0:
                    bottom = y0 + height
                    for c in COLOURS:
                        h = height * figures["proportions"].get(c, 0.0)
                        draw.rectangle([left, bottom - h, left + bar, bottom], fill=_RGB[c])
                        bottom -= h
                else:
                    h = height * (figures["fd"] or 0.0) / fd_max
                    draw.rectangle([left, y0 + height - h, left + bar, y0 + height], fill=(90, 90, 90))
                draw.text((left + 2, y0 + height + 3), str(i + 1), fill="black")
            x += len(runs) * (bar + 4) + group_gap
    legend = "   ".join(f"{i + 1}: {RUN_LABELS[r]}" for i, r in enumerate(runs))
    draw.text((10, canvas.height - 30), legend, fill="black")
    _save(canvas, path)
    return True


__all__ = ["RUN_LABELS", "save_charts", "save_grid"]
