"""The figures of one batch of generated images: distance to the target distribution, and what was kept.

Fairness discrepancy ``FD = || mean_i p_i - target ||_2`` soft (from the classifier's probabilities, as
DiffLens reports it) and hard (from argmax counts), per-class proportions with Wilson 95% intervals, KL to
the target, over the images the classifier could read. With groups (a content attribute such as the toy
world's shape) also FD per group and the mean of the per-group FDs: pooled figures let opposite skews of
different groups cancel. With twins (the same seeds sampled without the intervention): preservation,
CLIP-I ``(cos + 1) / 2`` of the image embeddings (DiffLens) and the pixel similarity ``1 - mean |a - b|``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..intervene.intervention import parse_target
from .classifier import check_classifier
from .metrics import Proportions, class_proportions, fairness_discrepancy, kl_to_target


class GroupFigures(NamedTuple):
    """FD of the images of one group."""

    name: str
    """Group name (e.g. a shape)."""
    n: int
    """Readable images in the group."""
    soft_fd: float
    """FD of the mean probabilities of the group."""
    hard_fd: float
    """FD of the argmax counts of the group."""


class Preservation(NamedTuple):
    """How similar each image is to its twin (same seed, no intervention)."""

    pixel: Tensor
    """(B,) float64 ``1 - mean |image - twin|`` over pixels and channels (images in [0, 1]); 1 = identical."""
    pixel_mean: float
    """Mean of ``pixel``."""
    clip_i: Tensor | None
    """(B,) float64 ``(cos + 1) / 2`` of the two images' embeddings, or None without embeddings."""
    clip_i_mean: float | None
    """Mean of ``clip_i``, or None."""


class MeasureReport(NamedTuple):
    """Every figure Measure Bias reports."""

    classifier: str
    """What classified the images (the classifier's ``name``)."""
    classes: tuple[str, ...]
    """Class names, in the order of every per-class figure."""
    target: tuple[float, ...]
    """Target share of each class (sums to 1)."""
    n: int
    """Images the figures come from (the readable ones)."""
    unreadable: int
    """Images the classifier could not read (left out of every figure)."""
    soft_fd: float
    """FD of the mean class probabilities."""
    hard_fd: float
    """FD of the argmax class counts."""
    kl: float
    """KL(mean probabilities || target), nats."""
    hard_kl: float
    """KL(argmax proportions || target), nats (inf when a class with target 0 occurs)."""
    soft: Proportions
    """Mean probability per class, with Wilson 95% intervals."""
    hard: Proportions
    """Argmax share per class, with Wilson 95% intervals."""
    labels: Tensor
    """(B,) int64 argmax class of every image, -1 where unreadable."""
    probabilities: Tensor
    """(B, C) float32 the classifier's probabilities."""
    groups: tuple[GroupFigures, ...]
    """Figures per group, in group order (groups without readable images left out); () without groups."""
    group_fd_soft: float | None
    """Mean over groups of the soft FD, or None without groups."""
    group_fd_hard: float | None
    """Mean over groups of the hard FD, or None without groups."""
    preservation: Preservation | None
    """Similarity to the twins, or None without twins."""

    @property
    def fd(self) -> float:
        """The headline FD: the mean of the per-group soft FDs with groups, else the soft FD."""
        return self.group_fd_soft if self.group_fd_soft is not None else self.soft_fd


def resolve_target(target: str | Sequence[float] | None, classes: Sequence[str]) -> tuple[float, ...]:
    """A target in Apply Feature Intervention's syntax (str), a sequence of weights, or None (uniform)."""
    if target is None:
        return tuple(1.0 / len(classes) for _ in classes)
    if isinstance(target, str):
        return parse_target(target, classes)
    weights = [float(w) for w in target]
    if len(weights) != len(classes) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"target {weights} must give one weight >= 0 per class {list(classes)}, not all 0")
    return tuple(w / sum(weights) for w in weights)


def _fds(probs: Tensor, num_classes: int, target: Tensor) -> tuple[float, float]:
    counts = torch.bincount(probs.argmax(-1), minlength=num_classes).double()
    return fairness_discrepancy(probs, target), fairness_discrepancy(counts, target)


def preservation(
    images: Tensor, twins: Tensor, embeddings: Tensor | None = None, twin_embeddings: Tensor | None = None
) -> Preservation:
    """images, twins: (B, H, W, 3) in [0, 1]; embeddings, twin_embeddings: (B, D) or None."""
    if images.shape != twins.shape:
        raise ValueError(
            f"twin images must match the images one for one (same batch, size and channels): images "
            f"{tuple(images.shape)}, twins {tuple(twins.shape)}; sample the twins with the same seed, batch and size"
        )
    difference = (images.detach().double() - twins.detach().double().to(images.device)).abs()
    pixel = (1.0 - difference.flatten(1).mean(1)).cpu()  # (B,)
    clip_i = None
    if embeddings is not None and twin_embeddings is not None:
        cosine = F.cosine_similarity(embeddings.double(), twin_embeddings.double(), dim=-1).clamp(
            -1.0, 1.0
        )  # (B,)
        clip_i = ((cosine + 1.0) / 2.0).cpu()
    return Preservation(pixel, float(pixel.mean()), clip_i, None if clip_i is None else float(clip_i.mean()))


def _readable(readable: Tensor | None, images: int, classifier: str) -> Tensor:
    """(B,) bool rows to measure; ValueError for a wrong shape or when none is readable."""
    ok = torch.ones(images, dtype=torch.bool) if readable is None else readable.detach().cpu().bool()
    if ok.shape != (images,):
        raise ValueError(f"readable must be ({images},), got {tuple(ok.shape)}")
    if not ok.any():
        raise ValueError(
            f"none of the {images} images could be read by the classifier {classifier!r}: nothing to "
            "measure; check that the images show what the classifier was made for"
        )
    return ok


def _group_figures(
    groups: tuple[Sequence[str], Tensor], probs: Tensor, ok: Tensor, goal: Tensor
) -> list[GroupFigures]:
    """FD of every group that has readable images. groups: (names, (B,) labels); probs: (B, C); ok: (B,)."""
    names, group_labels = tuple(groups[0]), groups[1].detach().cpu().long()
    if group_labels.shape != (probs.shape[0],):
        raise ValueError(f"group labels must be ({probs.shape[0]},), got {tuple(group_labels.shape)}")
    figures = []
    for g, name in enumerate(names):
        rows = ok & (group_labels == g)
        if rows.any():
            figures.append(
                GroupFigures(name, int(rows.sum()), *_fds(probs[rows].double(), probs.shape[1], goal))
            )
    return figures


def measure(
    probabilities: Tensor,
    classes: Sequence[str],
    target: str | Sequence[float] | None = None,
    *,
    readable: Tensor | None = None,
    groups: tuple[Sequence[str], Tensor] | None = None,
    kept: Preservation | None = None,
    classifier: str = "",
) -> MeasureReport:
    """The figures of ``probabilities`` (B, C) rows (one per image, summing to 1).

    readable: (B,) bool, False rows are left out (default: all readable); groups: (names, (B,) int64 labels,
    -1 = no group); target: Apply's syntax, weights, or None (uniform).
    """
    classes = tuple(classes)
    probs = probabilities.detach().to("cpu", torch.float32)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(
            f"probabilities must be (images, {len(classes)}) for classes {list(classes)}, got {tuple(probs.shape)}"
        )
    goal = resolve_target(target, classes)
    ok = _readable(readable, probs.shape[0], classifier)
    goal_t = torch.tensor(goal, dtype=torch.float64)
    labels = torch.where(ok, probs.argmax(-1), torch.full((), -1))
    used = probs[ok].double()  # (n, C)
    soft_fd, hard_fd = _fds(used, len(classes), goal_t)
    counts = torch.bincount(labels[ok], minlength=len(classes)).double()
    per_group = _group_figures(groups, probs, ok, goal_t) if groups is not None else []
    return MeasureReport(
        classifier=classifier,
        classes=classes,
        target=goal,
        n=int(ok.sum()),
        unreadable=int((~ok).sum()),
        soft_fd=soft_fd,
        hard_fd=hard_fd,
        kl=kl_to_target(used, goal_t),
        hard_kl=kl_to_target(counts, goal_t),
        soft=class_proportions(used, len(classes)),
        hard=class_proportions(labels[ok], len(classes)),
        labels=labels,
        probabilities=probs,
        groups=tuple(per_group),
        group_fd_soft=sum(g.soft_fd for g in per_group) / len(per_group) if per_group else None,
        group_fd_hard=sum(g.hard_fd for g in per_group) / len(per_group) if per_group else None,
        preservation=kept,
    )


def _optional(classifier: Any, member: str, images: Tensor) -> Any:
    method = getattr(classifier, member, None)
    return method(images) if callable(method) else None


def measure_images(
    classifier: Any, images: Tensor, target: str | Sequence[float] | None = None, twins: Tensor | None = None
) -> MeasureReport:
    """Classify ``images`` (B, H, W, 3) in [0, 1] and measure them (twins: the same shape, or None).

    Uses the classifier's optional ``readable``, ``groups`` and ``embed`` when it has them (images and twins
    are embedded in one call; ``probabilities_of_embeddings``, when present, then classifies without embedding
    the images again).
    """
    check_classifier(classifier)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (batch, height, width, 3), got {tuple(images.shape)}")
    kept = None
    if twins is None:
        probs = classifier.probabilities(images)
    else:
        if twins.shape != images.shape:
            preservation(images, twins)  # raises the message about mismatched twins
        embeddings = twin_embeddings = None
        if callable(getattr(classifier, "embed", None)):
            both = classifier.embed(torch.cat([images, twins.to(images)]))  # one call for both: (2B, D)
            embeddings, twin_embeddings = both[: images.shape[0]], both[images.shape[0] :]
        from_embeddings = getattr(classifier, "probabilities_of_embeddings", None)
        if embeddings is not None and callable(from_embeddings):
            probs = from_embeddings(embeddings)
        else:
            probs = classifier.probabilities(images)
        kept = preservation(images, twins, embeddings, twin_embeddings)
    return measure(
        probs,
        classifier.classes,
        target,
        readable=_optional(classifier, "readable", images),
        groups=_optional(classifier, "groups", images),
        kept=kept,
        classifier=classifier.name,
    )


__all__ = ["GroupFigures", "MeasureReport", "Preservation", "measure", "measure_images", "preservation",
           "resolve_target"]  # fmt: skip
