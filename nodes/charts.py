"""Charts as ComfyUI IMAGE tensors, drawn with Pillow: feature scores per class, probe accuracy per step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..diffbias_core import FeatureSet

_WIDTH = 760
_ROW = 16
_PAD = 12
COLOURS = ((70, 130, 220), (220, 100, 70), (80, 170, 90), (170, 90, 190), (200, 170, 40), (60, 170, 170))
BG, INK, GRID = (255, 255, 255), (25, 25, 25), (215, 215, 215)


def chart_font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _class_panel(
    draw: ImageDraw.ImageDraw,
    top: int,
    name: str,
    ids: torch.Tensor,
    scores: torch.Tensor,
    colour: tuple[int, int, int],
) -> int:
    """Horizontal bars of one class's best features; returns the y below the panel."""
    font = chart_font()
    draw.text((_PAD, top), f"{name}: top {ids.numel()} features (score)", fill=INK, font=font)
    top += _ROW + 2
    left, right = _PAD + 70, _WIDTH - _PAD - 80
    largest = float(scores.abs().max()) if scores.numel() else 1.0
    largest = largest if largest > 0 else 1.0
    for feature, score in zip(ids.tolist(), scores.tolist(), strict=True):
        length = int((right - left) * abs(score) / largest)
        draw.text((_PAD, top + 2), f"#{feature}", fill=INK, font=font)
        draw.rectangle((left, top + 2, left + max(length, 1), top + _ROW - 2), fill=colour)
        draw.text((left + length + 6, top + 2), f"{score:.3g}", fill=INK, font=font)
        top += _ROW
    return top + _PAD


def _accuracy_panel(draw: ImageDraw.ImageDraw, top: int, accuracy: Sequence[float]) -> int:
    """A line of probe accuracy (0..1) per sampling step; returns the y below the panel."""
    font = chart_font()
    draw.text(
        (_PAD, top),
        f"probe accuracy per step (mean {sum(accuracy) / len(accuracy):.2f})",
        fill=INK,
        font=font,
    )
    top += _ROW + 2
    height, left, right = 120, _PAD + 30, _WIDTH - _PAD
    for level in (0.0, 0.5, 1.0):
        y = top + int(height * (1 - level))
        draw.line((left, y, right, y), fill=GRID)
        draw.text((_PAD, y - 6), f"{level:.1f}", fill=INK, font=font)
    steps = max(len(accuracy) - 1, 1)
    points = [
        (left + int((right - left) * i / steps), top + int(height * (1 - min(max(a, 0.0), 1.0))))
        for i, a in enumerate(accuracy)
    ]
    if len(points) > 1:
        draw.line(points, fill=COLOURS[0], width=2)
    for x, y in points:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=COLOURS[0])
    draw.text((left, top + height + 4), "first step", fill=INK, font=font)
    draw.text((right - 50, top + height + 4), "last step", fill=INK, font=font)
    return top + height + _PAD + _ROW


def feature_chart(features: FeatureSet, top_k: int, accuracy: Sequence[float] | None = None) -> torch.Tensor:
    """IMAGE (1, H, W, 3) float32 in [0, 1]: the ``top_k`` best features of every class, and the probe
    accuracy per step when given."""
    shown = [(features.ids[c][:top_k], features.scores[c][:top_k]) for c in range(features.num_classes)]
    height = _PAD * 2 + _ROW + sum(_ROW * (ids.numel() + 1) + _PAD + 2 for ids, _ in shown)
    height += (120 + 3 * _ROW + _PAD) if accuracy else 0
    image = Image.new("RGB", (_WIDTH, height), BG)
    draw = ImageDraw.Draw(image)
    draw.text(
        (_PAD, _PAD),
        f"bias features ({features.method}) at {features.hook}, SAE {features.sae_fingerprint}",
        fill=INK,
        font=chart_font(),
    )
    top = _PAD + _ROW + 4
    for c, (ids, scores) in enumerate(shown):
        top = _class_panel(draw, top, features.classes[c], ids, scores.float(), COLOURS[c % len(COLOURS)])
    if accuracy:
        _accuracy_panel(draw, top, list(accuracy))
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).unsqueeze(0)  # (1, H, W, 3)


__all__ = ["BG", "COLOURS", "GRID", "INK", "chart_font", "feature_chart"]
