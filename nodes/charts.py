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
BG, INK, GRID, WARN = (255, 255, 255), (25, 25, 25), (215, 215, 215), (200, 30, 30)


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


def _wrap(text: str, width: int = 110) -> list[str]:
    """Lines of at most ``width`` characters (the default font is about 6 px per character)."""
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def feature_chart(features: FeatureSet, top_k: int, accuracy: Sequence[float] | None = None,
                  notes: Sequence[str] = ()) -> torch.Tensor:  # fmt: skip
    """IMAGE (1, H, W, 3) float32 in [0, 1]: the ``top_k`` best features of every class, the probe
    accuracy per step when given, and ``notes`` (warnings) in red at the top."""
    shown = [(features.ids[c][:top_k], features.scores[c][:top_k]) for c in range(features.num_classes)]
    lines = [line for note in notes for line in _wrap(f"WARNING: {note}")]
    height = _PAD * 2 + _ROW + sum(_ROW * (ids.numel() + 1) + _PAD + 2 for ids, _ in shown)
    height += (120 + 3 * _ROW + _PAD) if accuracy else 0
    height += _ROW * len(lines)
    image = Image.new("RGB", (_WIDTH, height), BG)
    draw = ImageDraw.Draw(image)
    draw.text(
        (_PAD, _PAD),
        f"bias features ({features.method}) at {features.hook}, SAE {features.sae_fingerprint}",
        fill=INK,
        font=chart_font(),
    )
    top = _PAD + _ROW + 4
    for line in lines:
        draw.text((_PAD, top), line, fill=WARN, font=chart_font())
        top += _ROW
    for c, (ids, scores) in enumerate(shown):
        top = _class_panel(draw, top, features.classes[c], ids, scores.float(), COLOURS[c % len(COLOURS)])
    if accuracy:
        _accuracy_panel(draw, top, list(accuracy))
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).unsqueeze(0)  # (1, H, W, 3)


def features_report(features: FeatureSet, top_k: int) -> tuple[str, list[str]]:
    """(text, warnings): the probe test and accuracy per step (when recorded) and the warnings of the
    ``top_k`` best features, as a user reads them in Preview Any."""
    from ..diffbias_core.attribute.features import feature_warnings, probe_accuracy

    warnings = feature_warnings(features, top_k)
    lines = [f"{features.method} features at {features.hook} ({', '.join(features.classes)}), SAE "
             f"{features.sae_fingerprint}"]  # fmt: skip
    if "probe_check" in features.provenance:
        lines.append(f"probes: {features.provenance['probe_check']}")
    accuracy = probe_accuracy(features)
    if accuracy:
        chance = 1 / features.num_classes
        lines.append(f"held-out probe accuracy per step (chance {chance:.2f}): "
                     + ", ".join(f"{step}: {value:.2f}" for step, value in accuracy))  # fmt: skip
    lines += [f"warning: {text}" for text in warnings] or ["no warnings"]
    return "\n".join(lines), warnings


__all__ = ["BG", "COLOURS", "GRID", "INK", "WARN", "chart_font", "feature_chart", "features_report"]
