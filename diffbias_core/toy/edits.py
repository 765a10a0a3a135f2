"""Edits of the toy bottleneck during sampling: the SAE feature intervention and the direction control.

Both act on ``unet.middle`` in a window of the schedule and give every image its own class
(``classes``: (N,) int64 over the whole request, -1 = leave the image alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attribute.features import FeatureSet
from ..intervene.intervention import EditSpec, edit_map, feature_table
from ..sae.model import SparseAutoencoder
from .sampling import Captured, EditFn, StepContext, in_window


@dataclass(frozen=True)
class Window:
    """Fraction [start, end) of the sampling schedule in which an edit acts (0 = first, noisiest step)."""

    start: float = 0.0
    """First fraction edited, in [0, 1)."""
    end: float = 1.0
    """End fraction (exclusive), in (start, 1]."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(
                f"edit window must satisfy 0 <= start < end <= 1, got [{self.start}, {self.end})"
            )

    def covers(self, ctx: StepContext) -> bool:
        """True when the step of ``ctx`` is edited."""
        return in_window(ctx, self.start, self.end)


def feature_edit(
    sae: SparseAutoencoder, features: FeatureSet, classes: Tensor, spec: EditSpec, window: Window
) -> EditFn:
    """The DiffLens intervention: per image, ``spec`` on its class's top features (``edit_map``)."""
    features.check_matches(sae)
    table = feature_table(features, spec.top_k)

    def edit(h: Tensor, ctx: StepContext) -> Tensor:
        if not window.covers(ctx):
            return h
        return edit_map(h, sae, table, classes[ctx.rows].to(h.device), spec)

    return edit


def class_mean_directions(captured: Captured, labels: Tensor, num_classes: int) -> Tensor:
    """Per step, each class's mean bottleneck map minus the mean over classes.

    captured.activations: (N, steps, C, H, W); labels: (N,) int64 in [0, num_classes).
    Returns (steps, num_classes, C, H, W).
    """
    acts = captured.activations
    means = torch.stack(
        [acts[labels == c].mean(0) for c in range(num_classes)], dim=1
    )  # (steps, classes, C, H, W)
    return means - means.mean(1, keepdim=True)


def direction_edit(directions: Tensor, classes: Tensor, window: Window, scale: float = 1.0) -> EditFn:
    """The control without an SAE: add ``scale`` times the class-mean difference map of the image's class.

    directions: (steps, classes, C, H, W) from :func:`class_mean_directions`; rows with class -1 are left.
    """

    def edit(h: Tensor, ctx: StepContext) -> Tensor:
        if not window.covers(ctx):
            return h
        rows = classes[ctx.rows].to(h.device)
        step = min(ctx.step, directions.shape[0] - 1)
        delta = directions[step].to(h)[rows.clamp_min(0)]  # (rows, C, H, W)
        return h + scale * delta * (rows >= 0).to(h.dtype).view(-1, 1, 1, 1)

    return edit


__all__ = ["Window", "class_mean_directions", "direction_edit", "feature_edit"]
