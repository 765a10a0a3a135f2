"""Charts of the measure stage (Pillow): Measure Bias (class shares against the target with Wilson intervals,
and a strip of thumbnails with the class each image was given) and Calibrate Intervention (FD per trial)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..diffbias_core.measure import CalibrationResult, MeasureReport
from .charts import BG, COLOURS, GRID, INK, chart_font

WIDTH = 760
PAD = 12
ROW = 16
BAR_HEIGHT = 150
THUMB = 64
MAX_THUMBS = 48


def _bars(draw: ImageDraw.ImageDraw, report: MeasureReport, top: int) -> int:
    """Hard share per class (bar) with its 95% interval (whisker), mean probability (dot), target (line)."""
    text = chart_font()
    title = f"FD {report.fd:.4f}" + (" (mean over groups)" if report.groups else "")
    draw.text((PAD, top), f"{title}, hard {report.hard_fd:.4f}, n {report.n}"
              + (f", {report.unreadable} unreadable" if report.unreadable else ""), fill=INK, font=text)  # fmt: skip
    top += ROW + 4
    left, right, bottom = PAD + 34, WIDTH - PAD, top + BAR_HEIGHT
    for level in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - int(BAR_HEIGHT * level)
        draw.line((left, y, right, y), fill=GRID)
        draw.text((PAD, y - 6), f"{int(level * 100)}%", fill=INK, font=text)
    slot = (right - left) / len(report.classes)
    for c, name in enumerate(report.classes):
        x0 = left + int(slot * c + slot * 0.2)
        x1 = left + int(slot * (c + 1) - slot * 0.2)
        share = float(report.hard.proportion[c])
        draw.rectangle((x0, bottom - int(BAR_HEIGHT * share), x1, bottom), fill=COLOURS[c % len(COLOURS)])
        mid = (x0 + x1) // 2
        low, high = (bottom - int(BAR_HEIGHT * float(v)) for v in (report.hard.low[c], report.hard.high[c]))
        draw.line((mid, low, mid, high), fill=INK, width=2)
        draw.line((mid - 6, low, mid + 6, low), fill=INK, width=2)
        draw.line((mid - 6, high, mid + 6, high), fill=INK, width=2)
        goal = bottom - int(BAR_HEIGHT * report.target[c])
        draw.line((x0 - 6, goal, x1 + 6, goal), fill=(200, 30, 30), width=3)
        soft = bottom - int(BAR_HEIGHT * float(report.soft.proportion[c]))
        draw.ellipse((mid - 4, soft - 4, mid + 4, soft + 4), outline=INK, fill=BG)
        draw.text((x0, bottom + 4), f"{name} {100 * share:.1f}%", fill=INK, font=text)
    top = bottom + ROW + 6
    draw.text((PAD, top), "bar: share (argmax), whisker: 95% interval, dot: mean probability, red line: target",
              fill=INK, font=text)  # fmt: skip
    return top + ROW + PAD


def _thumbnails(image: Image.Image, draw: ImageDraw.ImageDraw, images: torch.Tensor, report: MeasureReport,
                top: int) -> None:  # fmt: skip
    text = chart_font()
    shown = min(images.shape[0], MAX_THUMBS)
    draw.text((PAD, top), f"per image: class given by the classifier (first {shown} of {images.shape[0]})",
              fill=INK, font=text)  # fmt: skip
    top += ROW + 2
    small = F.interpolate(
        images[:shown].movedim(-1, 1).float(), size=(THUMB, THUMB), mode="nearest"
    )  # (n, 3, T, T)
    pixels = (small.clamp(0, 1).movedim(1, -1) * 255).round().byte().numpy()  # (n, T, T, 3)
    per_row = (WIDTH - PAD) // (THUMB + 8)
    for i in range(shown):
        x = PAD + (i % per_row) * (THUMB + 8)
        y = top + (i // per_row) * (THUMB + ROW + 6)
        label = int(report.labels[i])
        colour = COLOURS[label % len(COLOURS)] if label >= 0 else (120, 120, 120)
        draw.rectangle((x - 2, y - 2, x + THUMB + 1, y + THUMB + 1), outline=colour, width=2)
        image.paste(Image.fromarray(pixels[i]), (x, y))
        name = report.classes[label] if label >= 0 else "unreadable"
        draw.text((x, y + THUMB + 3), name[:11], fill=INK, font=text)


def measure_chart(report: MeasureReport, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (1, H, W, 3) float32 in [0, 1]. images: (B, H, W, 3), the measured images."""
    shown = min(images.shape[0], MAX_THUMBS)
    per_row = (WIDTH - PAD) // (THUMB + 8)
    rows = -(-shown // per_row)
    height = PAD + (ROW + 4) + BAR_HEIGHT + 2 * ROW + 6 + PAD + ROW + 2 + rows * (THUMB + ROW + 6) + PAD
    image = Image.new("RGB", (WIDTH, height), BG)
    draw = ImageDraw.Draw(image)
    top = _bars(draw, report, PAD)
    _thumbnails(image, draw, images.detach().cpu(), report, top)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).unsqueeze(0)  # (1, H, W, 3)


def calibration_chart(result: CalibrationResult, tolerance: float) -> torch.Tensor:
    """IMAGE (1, H, W, 3): FD of every calibration trial against its strength, the tolerance, the choice."""
    height = 300
    image = Image.new("RGB", (WIDTH, height), BG)
    draw = ImageDraw.Draw(image)
    text = chart_font()
    draw.text((PAD, PAD), f"calibration: FD per trial; chosen strength {result.strength:.4g} (FD {result.fd:.4f}), "
              f"{len(result.trials)} sampler runs", fill=INK, font=text)  # fmt: skip
    left, right, top, bottom = PAD + 40, WIDTH - PAD, PAD + ROW + 10, height - PAD - ROW - 4
    strengths = [t.strength for t in result.trials]
    low, high = min(strengths), max(strengths)
    high = high if high > low else low + 1.0
    largest = max(max(t.fd for t in result.trials), tolerance, 1e-6) * 1.1

    def x(s: float) -> int:
        return left + int((right - left) * (s - low) / (high - low))

    def y(fd: float) -> int:
        return bottom - int((bottom - top) * fd / largest)

    for level in (0.0, largest / 2, largest):
        draw.line((left, y(level), right, y(level)), fill=GRID)
        draw.text((PAD, y(level) - 6), f"{level:.3f}", fill=INK, font=text)
    draw.line((left, y(tolerance), right, y(tolerance)), fill=(200, 30, 30), width=2)
    draw.text((right - 120, y(tolerance) - 14), f"tolerance {tolerance:g}", fill=(200, 30, 30), font=text)
    points = sorted((t.strength, t.fd) for t in result.trials)
    draw.line([(x(s), y(f)) for s, f in points], fill=COLOURS[0], width=1)
    for i, trial in enumerate(result.trials):
        px, py = x(trial.strength), y(trial.fd)
        chosen = trial.strength == result.strength
        draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=COLOURS[1] if chosen else COLOURS[0])
        draw.text((px + 5, py - 12), str(i + 1), fill=INK, font=text)
    draw.text((left, bottom + 4), f"strength {low:.3g}", fill=INK, font=text)
    draw.text((right - 90, bottom + 4), f"{high:.3g}", fill=INK, font=text)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).unsqueeze(0)  # (1, H, W, 3)


__all__ = ["calibration_chart", "measure_chart"]
