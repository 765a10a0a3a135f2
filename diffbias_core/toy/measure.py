"""Figures of one set of generated images: class proportions, FD, shape accuracy, twin masks, hit rate."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..measure.metrics import class_proportions, fairness_discrepancy
from .oracles import Reading, mask_iou
from .world import COLOURS, SHAPES

TWIN_IOU = 0.8
"""An edited image keeps its unedited twin's shape mask when their IoU is at least this."""


def _round(x: float) -> float:
    return round(float(x), 4)


def _group(reading: Reading, shape: Tensor, assigned: Tensor | None, twin: Reading | None,
           rows: Tensor) -> dict[str, Any]:  # fmt: skip
    colour = reading.colour[rows]
    readable = colour >= 0
    out: dict[str, Any] = {"n": int(rows.sum()), "unreadable": _round((~readable).float().mean())}
    if readable.any():
        props = class_proportions(colour[readable], len(COLOURS))
        counts = torch.bincount(colour[readable], minlength=len(COLOURS))
        out["proportions"] = {c: _round(p) for c, p in zip(COLOURS, props.proportion.tolist(), strict=True)}
        out["proportions_ci95"] = {
            c: [_round(lo), _round(hi)]
            for c, lo, hi in zip(COLOURS, props.low.tolist(), props.high.tolist(), strict=True)
        }
        out["fd"] = _round(fairness_discrepancy(counts.double()))
    else:
        out["proportions"], out["proportions_ci95"], out["fd"] = {}, {}, None
    out["shape_accuracy"] = _round((reading.shape[rows] == shape[rows]).float().mean())
    if assigned is not None:
        out["assignment_hit_rate"] = _round((colour == assigned[rows]).float().mean())
    if twin is not None:
        iou = mask_iou(reading.mask[rows], twin.mask[rows])
        out["twin_mask_kept"] = _round((iou >= TWIN_IOU).float().mean())
        out["twin_mask_iou_mean"] = _round(iou.mean())
    return out


def summarize(reading: Reading, shape: Tensor, assigned: Tensor | None = None,
              twin: Reading | None = None) -> dict[str, Any]:  # fmt: skip
    """Figures overall and per shape.

    reading: oracle reading of N images; shape: (N,) prompted shapes; assigned: (N,) class each image
    was given (hit rate), or None; twin: reading of the unedited images from the same noise, or None.
    Overall ``fd`` is the mean of the per-shape FDs (a pooled FD would let opposite skews cancel);
    ``fd_pooled`` is the FD of all images together.
    """
    everything = torch.ones_like(shape, dtype=torch.bool)
    overall = _group(reading, shape, assigned, twin, everything)
    per_shape = {name: _group(reading, shape, assigned, twin, shape == k) for k, name in enumerate(SHAPES)
                 if bool((shape == k).any())}  # fmt: skip
    fds = [g["fd"] for g in per_shape.values() if g["fd"] is not None]
    overall["fd_pooled"] = overall["fd"]
    overall["fd"] = _round(sum(fds) / len(fds)) if fds else None
    overall["per_shape"] = per_shape
    return overall


__all__ = ["TWIN_IOU", "summarize"]
