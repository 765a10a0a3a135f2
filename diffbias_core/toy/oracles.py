"""Exact oracles for the toy world: read the colour, the shape and the foreground mask of an image.

Pixel rules only, no learned classifier. The background is a dark grey (brightness <= 0.35) and the
shape a light red, green or blue (brightness >= 0.6), so:

* foreground = pixels brighter than the midpoint (mean channel, in [0, 1] units), reduced to the
  largest 8-connected component (brightness, not colour, is what the toy model draws most
  precisely: see ``UNetConfig.chroma_scale``);
* colour = the channel with the largest mean over the foreground;
* shape = the template (circle, square, triangle, as the world renders them) with the highest IoU
  against the foreground, each fitted to its bounding box and to its area and centroid.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .world import COLOURS, SHAPES, shape_masks

BRIGHTNESS_THRESHOLD = 0.475
"""Foreground brightness threshold (mean of the channels, in [0, 1] units): between the brightest
background (0.35) and the darkest shape (0.6)."""
MIN_AREA = 8
"""Foregrounds smaller than this many pixels are unreadable (colour and shape -1)."""


class Reading(NamedTuple):
    """What the oracles read from a batch of images."""

    colour: Tensor
    """(B,) int64 index into COLOURS, -1 if no foreground was found."""
    shape: Tensor
    """(B,) int64 index into SHAPES, -1 if no foreground was found."""
    mask: Tensor
    """(B, S, S) bool foreground mask (largest connected component)."""
    shape_iou: Tensor
    """(B,) float IoU of the best-fitting template with the mask (0 when unreadable)."""


def largest_component(mask: Tensor) -> Tensor:
    """Largest 8-connected component of each mask. mask: (B, H, W) bool -> (B, H, W) bool."""
    b, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w).expand(b, 1, h, w)
    fg = mask.unsqueeze(1)  # (B, 1, H, W)
    labels = torch.where(fg, ids, torch.zeros(()))
    for _ in range(h + w):  # label propagation: every pixel takes the largest id of its component
        grown = torch.where(fg, F.max_pool2d(labels, 3, stride=1, padding=1), torch.zeros(()))
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.view(b, h * w).long()  # (B, H*W), 0 = background
    counts = torch.zeros(b, h * w + 1, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, 0] = 0
    best = counts.argmax(1, keepdim=True)  # (B, 1)
    return (flat == best).view(b, h, w) & mask


def foreground(images: Tensor, threshold: float = BRIGHTNESS_THRESHOLD) -> Tensor:
    """images: (B, 3, S, S) in [-1, 1] -> (B, S, S) bool foreground (largest bright component)."""
    brightness = (images.float().clamp(-1, 1).mean(1) + 1) / 2  # (B, S, S)
    return largest_component(brightness > threshold)


def _bbox(mask: Tensor) -> tuple[Tensor, Tensor]:
    """mask: (B, S, S) -> centre (B, 2) (x, y) and extent (B,) of the bounding box (pixel units)."""
    s = mask.shape[-1]
    idx = torch.arange(s, dtype=torch.float32)
    rows, cols = mask.any(2), mask.any(1)  # (B, S) each
    big = float(s)
    r0 = torch.where(rows, idx, big).amin(1)
    r1 = torch.where(rows, idx, -big).amax(1) + 1
    c0 = torch.where(cols, idx, big).amin(1)
    c1 = torch.where(cols, idx, -big).amax(1) + 1
    centre = torch.stack([(c0 + c1) / 2, (r0 + r1) / 2], dim=1)
    extent = ((c1 - c0) + (r1 - r0)) / 2
    return centre, extent


_AREA_PER_SIZE2 = (math.pi / 4, 1.0, 0.5)  # template area / size^2 for circle, square, triangle
_CENTROID_DROP = (0.0, 0.0, 1.0 / 6)  # template centroid below its centre, in sizes (triangle: s/6)


def _moments(mask: Tensor) -> tuple[Tensor, Tensor]:
    """mask: (B, S, S) -> centroid (B, 2) (x, y) in pixel units and area (B,)."""
    s = mask.shape[-1]
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    weights = mask.float()
    area = weights.flatten(1).sum(1)
    x = (weights.sum(1) * coords).sum(1) / area.clamp_min(1)
    y = (weights.sum(2) * coords).sum(1) / area.clamp_min(1)
    return torch.stack([x, y], dim=1), area


def _iou(a: Tensor, b: Tensor) -> Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    return inter / (a | b).flatten(1).sum(1).float().clamp_min(1)


def classify_shape(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Best template per mask. mask: (B, S, S) bool -> (shape (B,) int64, iou (B,) float).

    Each template is fitted two ways and the better IoU counts: to the bounding box (exact for clean
    renders), and by moments, with the template's area and centroid set to the mask's (robust to
    the odd stray or missing edge pixel of a generated image).
    """
    b, s = mask.shape[0], mask.shape[-1]
    box_centre, extent = _bbox(mask)
    centroid, area = _moments(mask)
    best_iou = torch.zeros(b, len(SHAPES))
    for k in range(len(SHAPES)):
        kind = torch.full((b,), k)
        fits = [(box_centre, extent + grow) for grow in (0.0, 0.5, 1.0)]
        size = (area / _AREA_PER_SIZE2[k]).sqrt()
        for scale in (0.95, 1.0, 1.05):
            centre = centroid - torch.stack([torch.zeros(b), _CENTROID_DROP[k] * size * scale], dim=1)
            fits.append((centre, size * scale))
        for centre, size_k in fits:
            best_iou[:, k] = torch.maximum(best_iou[:, k], _iou(shape_masks(kind, centre, size_k, s), mask))
    iou, shape = best_iou.max(1)
    return shape, iou


def read(images: Tensor) -> Reading:
    """Read colour, shape and mask. images: (B, 3, S, S) in [-1, 1]."""
    mask = foreground(images)
    area = mask.flatten(1).sum(1)  # (B,)
    readable = area >= MIN_AREA
    weights = mask.unsqueeze(1).float()  # (B, 1, S, S)
    mean_rgb = (images.float() * weights).flatten(2).sum(2) / weights.flatten(2).sum(2).clamp_min(1)  # (B, 3)
    colour = torch.where(readable, mean_rgb.argmax(1), -1)
    shape, iou = classify_shape(mask)
    shape = torch.where(readable, shape, -1)
    return Reading(colour, shape, mask, torch.where(readable, iou, 0.0))


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of paired masks. a, b: (B, S, S) bool -> (B,) float (1 when both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones(()))


__all__ = [
    "COLOURS",
    "SHAPES",
    "Reading",
    "classify_shape",
    "foreground",
    "largest_component",
    "mask_iou",
    "read",
]
