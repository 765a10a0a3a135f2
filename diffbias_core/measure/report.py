"""Text for people: a Measure report as readable lines, and the per-image labels as CSV."""

from __future__ import annotations

from collections.abc import Sequence

from .classifier import FitReport
from .measure import MeasureReport

CHANCE_MARGIN = 0.5
"""A probe whose mean held-out accuracy is below chance + this share of the way to 1 gets a warning."""


def _share(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_report(report: MeasureReport) -> str:
    """The report as lines of text (what Measure Bias shows; wire it to Preview Any)."""
    lines = [
        f"classifier: {report.classifier}",
        f"images: {report.n} measured"
        + (f", {report.unreadable} unreadable (left out)" if report.unreadable else ""),
        f"FD soft {report.soft_fd:.4f}, hard {report.hard_fd:.4f} (0 = on target); "
        f"KL soft {report.kl:.4f}, hard {report.hard_kl:.4f} nats",
        "class: share (hard, Wilson 95% interval) | mean probability | target",
    ]
    for c, name in enumerate(report.classes):
        lines.append(
            f"  {name}: {_share(report.hard.proportion[c])} [{_share(report.hard.low[c])}, "
            f"{_share(report.hard.high[c])}] | {_share(report.soft.proportion[c])} | "
            f"{_share(report.target[c])}"
        )
    if report.groups:
        lines.append(
            f"FD per group (soft/hard); mean over groups soft {report.group_fd_soft:.4f}, "
            f"hard {report.group_fd_hard:.4f}:"
        )
        lines += [f"  {g.name} (n {g.n}): {g.soft_fd:.4f} / {g.hard_fd:.4f}" for g in report.groups]
    kept = report.preservation
    if kept is not None:
        clip = (
            f"CLIP-I {kept.clip_i_mean:.4f}, " if kept.clip_i_mean is not None else "CLIP-I n/a (no embed), "
        )
        lines.append(
            f"kept vs twins (1 = identical): {clip}pixel similarity (1 - mean |a - b|) {kept.pixel_mean:.4f}, "
            f"lowest {float(kept.pixel.min()):.4f}"
        )
    return "\n".join(lines)


def per_image_table(report: MeasureReport) -> str:
    """CSV, one row per image: index, label (class name or ``unreadable``), probability of every class,
    and the twin similarities when measured."""
    kept = report.preservation
    head = ["image", "label", *[f"p_{name}" for name in report.classes]]
    if kept is not None:
        head += ["pixel_similarity"] + (["clip_i"] if kept.clip_i is not None else [])
    rows = [",".join(head)]
    for i, label in enumerate(report.labels.tolist()):
        cells = [str(i), report.classes[label] if label >= 0 else "unreadable"]
        cells += [f"{p:.6f}" for p in report.probabilities[i].tolist()]
        if kept is not None:
            cells.append(f"{float(kept.pixel[i]):.6f}")
            if kept.clip_i is not None:
                cells.append(f"{float(kept.clip_i[i]):.6f}")
        rows.append(",".join(cells))
    return "\n".join(rows)


def format_fit(report: FitReport, classes: Sequence[str]) -> str:
    """Held-out accuracy per class of a fitted probe, and a warning when it is near chance."""
    chance = 1.0 / len(classes)
    lines = [f"held-out accuracy (balanced) {report.mean_heldout_accuracy:.3f}, chance {chance:.3f}; "
             f"training accuracy {report.train_accuracy:.3f}"]  # fmt: skip
    for name, accuracy, held, train in zip(
        classes, report.heldout_accuracy, report.heldout, report.train, strict=True
    ):
        lines.append(f"  {name}: {accuracy:.3f} on {held} held-out images ({train} used to fit)")
    if report.mean_heldout_accuracy < chance + CHANCE_MARGIN * (1.0 - chance):
        lines.append(
            "WARNING: held-out accuracy is near chance: this vision model does not tell the classes apart in "
            "these images, so the figures it measures mean little. Use more images per class, prompts that "
            "differ more, or another vision model."
        )
    return "\n".join(lines)


__all__ = ["format_fit", "format_report", "per_image_table"]
