"""Image classifiers for measuring: the ``ImageClassifier`` protocol and a linear probe on image embeddings.

Any object with ``classes``, ``name`` and ``probabilities(images)`` is a classifier (structural typing);
``groups``, ``readable`` and ``embed`` are optional and used when present (see :class:`ImageClassifier`).
A classifier must not read the hook activation an intervention edits: that would measure the edit, not
the image.

:class:`LinearProbe` is a multinomial logistic regression on L2-normalised, standardised image embeddings
(e.g. CLIP vision ``image_embeds``), fitted deterministically (full-batch L-BFGS on a strictly convex loss)
on a seeded, stratified split, with its held-out accuracy per class; ``probe_file.py`` saves and loads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base.grad_mode import trainable

SAME_MODEL_COSINE = 0.99
"""Smallest cosine between the stored and the current reference embedding for "the same vision model"."""


@runtime_checkable
class ImageClassifier(Protocol):
    """What Measure Bias and Calibrate Intervention need from a classifier.

    Optional members, used when present (``getattr``):

    * ``groups(images) -> (names, labels)``: a content attribute to condition on; labels (B,) int64, -1 =
      unreadable. The report then gives FD per group and their mean.
    * ``readable(images) -> (B,) bool``: False where the image could not be classified (its row is uniform).
    * ``embed(images) -> (B, D) float32``: image embeddings, for CLIP-I against twins.
    """

    classes: tuple[str, ...]
    """Class names in the order of the probability columns."""
    name: str
    """One line for reports: what the classifier is."""

    def probabilities(self, images: Tensor) -> Tensor:
        """images: (B, H, W, 3) float in [0, 1] -> (B, len(classes)) float32 on CPU, rows summing to 1."""
        ...


def check_classifier(classifier: Any) -> None:
    """TypeError unless ``classifier`` has ``classes`` (>= 2 names), ``name`` and ``probabilities``."""
    classes = getattr(classifier, "classes", None)
    if not callable(getattr(classifier, "probabilities", None)) or not isinstance(
        getattr(classifier, "name", None), str
    ):
        raise TypeError(
            f"{type(classifier).__name__} is not an image classifier: it needs 'classes', 'name' and "
            "'probabilities(images)'"
        )
    if not isinstance(classes, tuple) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise TypeError(
            f"classifier {classifier.name!r}: 'classes' must be a tuple of >= 2 names, got {classes!r}"
        )


@dataclass(frozen=True)
class FitConfig:
    """How :func:`fit_probe` fits the probe."""

    holdout: float = 0.25
    """Share of each class's samples held out to measure accuracy, in (0, 1). Every class with >= 2
    samples keeps at least one sample on each side."""
    l2: float = 1e-2
    """L2 penalty on the weights (>= 0; > 0 makes the optimum unique)."""
    max_iter: int = 500
    """L-BFGS iterations at most (>= 1)."""
    seed: int = 0
    """Seed of the train/held-out split."""

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"FitConfig.holdout must be in (0, 1), got {self.holdout!r}")
        if not (math.isfinite(self.l2) and self.l2 >= 0):
            raise ValueError(f"FitConfig.l2 must be finite and >= 0, got {self.l2!r}")
        if self.max_iter < 1:
            raise ValueError(f"FitConfig.max_iter must be >= 1, got {self.max_iter!r}")


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """Multinomial logistic regression on normalised embeddings: p = softmax(W ((e/|e|) - mean) / scale + b)."""

    classes: tuple[str, ...]
    """Class names in column order."""
    weight: Tensor
    """(C, D) float32."""
    bias: Tensor
    """(C,) float32."""
    mean: Tensor
    """(D,) float32 mean of the training embeddings (after L2 normalisation)."""
    scale: Tensor
    """(D,) float32 standard deviation of the training embeddings (floored), > 0."""
    vision_model: str = "unknown"
    """Name of the vision model whose embeddings it reads (e.g. its file name)."""
    reference_embedding: Tensor | None = None
    """(D,) that model's embedding of :func:`reference_image`, or None."""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    """How it was made (JSON-serialisable): data, split, held-out accuracy per class."""

    @property
    def embedding_width(self) -> int:
        """D, the width of the embeddings it reads."""
        return int(self.weight.shape[1])

    def logits(self, embeddings: Tensor) -> Tensor:
        """embeddings: (B, D) -> (B, C) float32 logits."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_width:
            raise ValueError(
                f"the probe reads embeddings of width {self.embedding_width}, got shape "
                f"{tuple(embeddings.shape)}; use the vision model it was trained with ({self.vision_model})"
            )
        x = (_unit(embeddings.detach().to("cpu", torch.float32)) - self.mean) / self.scale  # (B, D)
        return x @ self.weight.T + self.bias

    def probabilities(self, embeddings: Tensor) -> Tensor:
        """embeddings: (B, D) -> (B, C) float32 class probabilities."""
        return self.logits(embeddings).softmax(-1)


class FitReport(NamedTuple):
    """Accuracy of a fitted probe."""

    heldout_accuracy: tuple[float, ...]
    """Per class, the share of its held-out samples classified correctly."""
    heldout: tuple[int, ...]
    """Per class, held-out samples."""
    train: tuple[int, ...]
    """Per class, training samples."""
    train_accuracy: float
    """Accuracy on the training samples (much above held-out = overfitting)."""

    @property
    def mean_heldout_accuracy(self) -> float:
        """Mean over classes of the held-out accuracy (balanced accuracy)."""
        return sum(self.heldout_accuracy) / len(self.heldout_accuracy)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def split_indices(labels: Tensor, num_classes: int, holdout: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded stratified split of sample indices: (train, heldout), each (n,) int64, sorted.

    labels: (N,) int64 in [0, num_classes); every class needs >= 2 samples.
    """
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        count = members.numel()
        if count < 2:
            raise ValueError(
                f"class {c} has {count} sample(s); every class needs >= 2 (one to fit, one to check)"
            )
        members = members[torch.randperm(count, generator=generator)]
        n_held = min(max(round(count * holdout), 1), count - 1)
        held.append(members[:n_held])
        train.append(members[n_held:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def _fit_logistic(x: Tensor, y: Tensor, classes: int, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Minimise mean cross-entropy + l2/2 |W|^2 over W (C, D), b (C,); x: (n, D) float64, y: (n,)."""
    with trainable():
        x, y = x.clone(), y.clone()  # inference tensors cannot enter autograd
        weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
            history_size=20, line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return weight.detach(), bias.detach()


def fit_probe(
    embeddings: Tensor,
    labels: Tensor,
    classes: Sequence[str],
    config: FitConfig = FitConfig(),
    *,
    vision_model: str = "unknown",
    reference_embedding: Tensor | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> tuple[LinearProbe, FitReport]:
    """Fit a :class:`LinearProbe` on the training part of a stratified split; report held-out accuracy.

    embeddings: (N, D) float; labels: (N,) int64 in [0, len(classes)). The returned probe is the one fitted
    on the training part (the held-out accuracy describes exactly the probe returned). Deterministic.
    """
    classes = tuple(classes)
    if len(classes) < 2:
        raise ValueError(f"a classifier needs >= 2 classes, got {list(classes)}")
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(
            f"expected embeddings (N, D) and labels (N,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.detach().to("cpu", torch.int64)
    if (labels < 0).any() or (labels >= len(classes)).any():
        raise ValueError(f"labels must be in [0, {len(classes)}), found {sorted(set(labels.tolist()))}")
    x = _unit(embeddings.detach().to("cpu", torch.float64))  # (N, D)
    if not torch.isfinite(x).all():
        raise ValueError("embeddings hold non-finite values (NaN or inf)")
    try:
        train, held = split_indices(labels, len(classes), config.holdout, config.seed)
    except ValueError as error:
        counts = torch.bincount(labels, minlength=len(classes)).tolist()
        raise ValueError(f"{error}; samples per class {dict(zip(classes, counts, strict=True))}") from None
    mean = x[train].mean(0)  # (D,)
    scale = x[train].std(0, correction=0).clamp_min(1e-6)  # (D,); constant dimensions stay finite
    weight, bias = _fit_logistic(
        (x[train] - mean) / scale, labels[train], len(classes), config.l2, config.max_iter
    )
    probe = LinearProbe(
        classes, weight.float(), bias.float(), mean.float(), scale.float(), vision_model,
        None if reference_embedding is None else reference_embedding.detach().to("cpu", torch.float32).flatten(),
        {},
    )  # fmt: skip
    predicted = probe.logits(embeddings.detach().float()).argmax(-1)  # (N,)
    correct = predicted == labels
    per_class = tuple(float(correct[held][labels[held] == c].float().mean()) for c in range(len(classes)))
    report = FitReport(
        heldout_accuracy=per_class,
        heldout=tuple(int((labels[held] == c).sum()) for c in range(len(classes))),
        train=tuple(int((labels[train] == c).sum()) for c in range(len(classes))),
        train_accuracy=float(correct[train].float().mean()),
    )
    facts = {
        **(provenance or {}),
        "heldout_accuracy": {c: round(a, 4) for c, a in zip(classes, per_class, strict=True)},
        "heldout": dict(zip(classes, report.heldout, strict=True)),
        "train": dict(zip(classes, report.train, strict=True)),
        "train_accuracy": round(report.train_accuracy, 4),
        "fit": {"holdout": config.holdout, "l2": config.l2, "seed": config.seed},
    }
    return replace(probe, provenance=facts), report


def reference_image(size: int = 224) -> Tensor:
    """A fixed synthetic picture (1, size, size, 3) in [0, 1]: colour ramps and rings, to fingerprint a
    vision model by its embedding of it."""
    axis = torch.linspace(0.0, 1.0, size, dtype=torch.float64)
    y, x = torch.meshgrid(axis, axis, indexing="ij")  # (size, size) each
    radius = ((x - 0.5).square() + (y - 0.5).square()).sqrt()
    red, green = x, y
    blue = 0.5 + 0.5 * torch.cos(radius * 8 * math.pi)
    return torch.stack([red, green, blue], -1).unsqueeze(0).float()  # (1, size, size, 3)


def check_same_model(probe: LinearProbe, reference_now: Tensor, where: str) -> None:
    """ValueError when the vision model given is not the one the probe was trained with.

    reference_now: (D,) or (1, D) the current model's embedding of :func:`reference_image`.
    """
    now = reference_now.detach().to("cpu", torch.float32).flatten()
    if now.numel() != probe.embedding_width:
        raise ValueError(
            f"{where}: the classifier reads {probe.embedding_width}-wide embeddings of {probe.vision_model!r}, "
            f"but the vision model given makes {now.numel()}-wide ones; load the vision model it was trained with"
        )
    if probe.reference_embedding is None:
        return
    cosine = float(F.cosine_similarity(now, probe.reference_embedding, dim=0))
    if cosine < SAME_MODEL_COSINE:
        raise ValueError(
            f"{where}: the vision model given is not the one the classifier was trained with "
            f"({probe.vision_model!r}): their embeddings of the same reference picture have cosine {cosine:.3f} "
            f"(expected >= {SAME_MODEL_COSINE}); load that vision model, or train a new classifier"
        )


def embed_in_chunks(embed_fn: Callable[[Tensor], Tensor], images: Tensor, chunk: int) -> Tensor:
    """``embed_fn`` over chunks of at most ``chunk`` images: (B, H, W, 3) -> (B, D) float32 on the CPU."""
    step = max(int(chunk), 1)
    parts = [embed_fn(images[i : i + step]) for i in range(0, images.shape[0], step)]
    return torch.cat([p.detach().to("cpu", torch.float32) for p in parts])


class EmbeddingClassifier:
    """An :class:`ImageClassifier`: a vision model's embedding, then a :class:`LinearProbe`.

    embed_fn: images (B, H, W, 3) in [0, 1] -> (B, D) embeddings; called on chunks of ``chunk`` images.
    """

    def __init__(self, probe: LinearProbe, embed_fn: Callable[[Tensor], Tensor], chunk: int = 16) -> None:
        self.probe = probe
        self.classes = probe.classes
        self.name = (
            f"linear probe on vision embeddings ({probe.vision_model}), {len(probe.classes)} classes "
            f"({', '.join(probe.classes)})"
        )
        self._embed_fn = embed_fn
        self._chunk = max(int(chunk), 1)

    def embed(self, images: Tensor) -> Tensor:
        """images: (B, H, W, 3) -> (B, D) float32 on the CPU."""
        return embed_in_chunks(self._embed_fn, images, self._chunk)

    def probabilities(self, images: Tensor) -> Tensor:
        """images: (B, H, W, 3) -> (B, C) float32 class probabilities."""
        return self.probe.probabilities(self.embed(images))

    def probabilities_of_embeddings(self, embeddings: Tensor) -> Tensor:
        """embeddings: (B, D) from :meth:`embed` -> (B, C) float32 class probabilities."""
        return self.probe.probabilities(embeddings)


__all__ = [
    "EmbeddingClassifier",
    "FitConfig",
    "FitReport",
    "ImageClassifier",
    "LinearProbe",
    "check_classifier",
    "check_same_model",
    "embed_in_chunks",
    "fit_probe",
    "reference_image",
    "split_indices",
]
