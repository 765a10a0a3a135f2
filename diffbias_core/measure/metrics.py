"""Fairness metrics: fairness discrepancy, class proportions with Wilson intervals, KL to a target.

Inputs are either per-sample class probabilities ``(n, classes)`` (each row sums to 1; "soft" metrics, as
DiffLens reports them) or, for :func:`fairness_discrepancy` and :func:`kl_to_target`, class counts
``(classes,)`` ("hard" metrics from argmax labels). The target distribution is uniform unless given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import NamedTuple

import torch
from torch import Tensor

ArrayLike = Tensor | Sequence[float] | Sequence[Sequence[float]]
SUM_TOLERANCE = 1e-3
"""How far a probability row or a target may sum from 1."""


class Proportions(NamedTuple):
    """Per-class proportions of a sample with Wilson score confidence intervals."""

    proportion: Tensor
    """(classes,) float64 share of each class (mean probability for soft input)."""
    low: Tensor
    """(classes,) float64 lower end of the interval."""
    high: Tensor
    """(classes,) float64 upper end of the interval."""
    n: int
    """Number of samples the proportions come from."""


def _as_float64(values: ArrayLike, what: str) -> Tensor:
    if isinstance(values, Tensor):
        tensor = values.detach().to("cpu", torch.float64)
    else:
        tensor = torch.as_tensor(values, dtype=torch.float64)  # python floats are float64: keep every digit
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} must be finite, got {tensor.tolist()}")
    if (tensor < 0).any():
        raise ValueError(f"{what} must be >= 0, found {tensor.min().item()}")
    return tensor


def _distribution(p: ArrayLike) -> Tensor:
    """Mean class distribution: rows of probabilities (n, classes) or counts (classes,) -> (classes,)."""
    tensor = _as_float64(p, "p")
    if tensor.ndim == 1:
        if tensor.numel() < 2 or tensor.sum() <= 0:
            raise ValueError(
                f"class counts must have >= 2 classes and a positive total, got {tensor.tolist()}"
            )
        return tensor / tensor.sum()
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] < 2:
        raise ValueError(
            f"p must be (n, classes) probabilities or (classes,) counts, got shape {tuple(tensor.shape)}"
        )
    sums = tensor.sum(1)
    worst = (sums - 1).abs().max().item()
    if worst > SUM_TOLERANCE:
        raise ValueError(
            f"each row of p must sum to 1 (within {SUM_TOLERANCE}); a row sums to {1 + worst:.6g}"
        )
    return tensor.mean(0)


def _target(target: ArrayLike | None, classes: int) -> Tensor:
    if target is None:
        return torch.full((classes,), 1.0 / classes, dtype=torch.float64)
    tensor = _as_float64(target, "target")
    if tensor.shape != (classes,):
        raise ValueError(f"target must have one entry per class ({classes}), got shape {tuple(tensor.shape)}")
    if abs(tensor.sum().item() - 1) > SUM_TOLERANCE:
        raise ValueError(f"target must sum to 1 (within {SUM_TOLERANCE}), got {tensor.sum().item():.6g}")
    return tensor


def fairness_discrepancy(p: ArrayLike, target: ArrayLike | None = None) -> float:
    """FD = || mean_i p_i - target ||_2.

    p: (n, classes) probabilities -> soft FD; (classes,) counts -> hard FD from the proportions.
    target: (classes,) summing to 1; uniform when None.
    """
    mean = _distribution(p)
    return float(torch.linalg.vector_norm(mean - _target(target, mean.numel())))


def kl_to_target(p: ArrayLike, target: ArrayLike | None = None) -> float:
    """KL(mean distribution || target) in nats; inputs as in :func:`fairness_discrepancy`.

    0 log 0 = 0; ``inf`` when a class with zero target share occurs.
    """
    mean = _distribution(p)
    goal = _target(target, mean.numel())
    present = mean > 0
    if (goal[present] == 0).any():
        return math.inf
    return float((mean[present] * (mean[present] / goal[present]).log()).sum())


def class_proportions(labels_or_probs: ArrayLike, num_classes: int, confidence: float = 0.95) -> Proportions:
    """Per-class proportions with Wilson score intervals at ``confidence``.

    labels_or_probs: (n,) integer labels in [0, num_classes), or (n, num_classes) probabilities (soft
    proportions; the interval treats them as n Bernoulli trials).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    data = torch.as_tensor(labels_or_probs).detach().to("cpu")
    if data.ndim == 1 and not data.is_floating_point():
        if data.numel() == 0 or (data < 0).any() or (data >= num_classes).any():
            raise ValueError(
                f"labels must be a non-empty (n,) tensor of ints in [0, {num_classes}), got {data.tolist()}"
            )
        n = data.numel()
        proportion = torch.bincount(data.long(), minlength=num_classes).double() / n
    elif data.ndim == 2 and data.shape[1] == num_classes:
        n = data.shape[0]
        proportion = _distribution(data)
    else:
        raise ValueError(
            f"expected (n,) integer labels or (n, {num_classes}) probabilities, got {data.dtype} {tuple(data.shape)}"
        )
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denominator = 1 + z * z / n
    centre = (proportion + z * z / (2 * n)) / denominator
    half = z / denominator * torch.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n))
    return Proportions(proportion, (centre - half).clamp(0, 1), (centre + half).clamp(0, 1), n)


__all__ = ["Proportions", "class_proportions", "fairness_discrepancy", "kl_to_target"]
