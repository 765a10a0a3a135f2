"""FeatureSet: the bias features of an SAE, ranked per class.

A FeatureSet lists, for every class of a protected attribute ("male", "female", ...), the SAE latents
that carry it, best first, with their attribution scores. It is tied to one SAE by the SAE's
fingerprint: feature ids mean nothing under another dictionary.

Files: :func:`save_features` / :func:`load_features` (one ``.safetensors`` file, see ``formats.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..base.safefile import check_metadata_version, read_safetensors, write_safetensors
from ..base.tensorfile import FormatError

if TYPE_CHECKING:
    from ..sae.model import SparseAutoencoder

FEATURES_FORMAT = "diffbias.features"
"""Value of the ``format`` metadata key of a feature-set file."""
FEATURES_VERSION = 1
"""Version of the feature-set file layout this code writes (and the newest it reads)."""


@dataclass(frozen=True)
class FeatureSet:
    """Ranked SAE latents per class, tied to the SAE they index."""

    classes: tuple[str, ...]
    """Class names in label order, e.g. ("male", "female"); at least two, unique."""
    ids: tuple[Tensor, ...]
    """Per class: (n_c,) int64 latent ids, best first."""
    scores: tuple[Tensor, ...]
    """Per class: (n_c,) float32 attribution scores, same order as ``ids`` (descending)."""
    sae_fingerprint: str
    """``SparseAutoencoder.fingerprint()`` of the SAE whose latents ``ids`` index."""
    hook: str
    """Hook point of that SAE (``unet.middle``, ...)."""
    method: str
    """How the ranking was made: ``ig``, ``mean-diff``, ``random``, ..."""
    provenance: Mapping[str, str] = field(default_factory=dict)
    """Free-form string facts: prompts, steps, seed, samples, baseline, ..."""

    def __post_init__(self) -> None:
        classes = tuple(self.classes)
        if len(classes) < 2 or not all(isinstance(name, str) and name for name in classes):
            raise ValueError(f"FeatureSet: classes must be at least two non-empty names, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"FeatureSet: class names must be unique, got {classes!r}")
        ids, scores = tuple(self.ids), tuple(self.scores)
        if len(ids) != len(classes) or len(scores) != len(classes):
            raise ValueError(
                f"FeatureSet: expected one ids and one scores tensor per class ({len(classes)}), "
                f"got {len(ids)} ids and {len(scores)} scores tensors"
            )
        for name, class_ids, class_scores in zip(classes, ids, scores, strict=True):
            _check_class_tensors(name, class_ids, class_scores)
        for key, value in (
            ("sae_fingerprint", self.sae_fingerprint),
            ("hook", self.hook),
            ("method", self.method),
        ):
            if not isinstance(value, str):
                raise ValueError(f"FeatureSet: {key} must be a string, got {value!r}")
        provenance = dict(self.provenance)
        bad = {k: v for k, v in provenance.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise ValueError(f"FeatureSet: provenance keys and values must be strings, got {bad!r}")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "provenance", provenance)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def class_index(self, name: str) -> int:
        """Position of class ``name`` in :attr:`classes`; ValueError naming the known classes."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise ValueError(
                f"unknown class {name!r}; this feature set has classes {list(self.classes)}"
            ) from None

    def top(self, class_index: int, k: int) -> Tensor:
        """The ``k`` best latent ids of one class: (min(k, n_c),) int64 (fewer when the class has fewer)."""
        if not isinstance(class_index, int) or not -self.num_classes <= class_index < self.num_classes:
            raise ValueError(f"class_index must be in [0, {self.num_classes}), got {class_index!r}")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        return self.ids[class_index][:k]

    def check_matches(self, sae: SparseAutoencoder) -> None:
        """Raise ValueError unless ``sae`` is the SAE these feature ids were ranked on."""
        fingerprint = sae.fingerprint()
        if fingerprint != self.sae_fingerprint:
            raise ValueError(
                f"this feature set was made for the SAE with fingerprint {self.sae_fingerprint} (hook "
                f"{self.hook!r}), but the SAE given has fingerprint {fingerprint} (hook {sae.hook!r}); "
                "load the SAE the features were found on, or find the features again for this SAE"
            )
        largest = max((int(t.max()) for t in self.ids if t.numel()), default=-1)
        if largest >= sae.num_latents:
            raise ValueError(
                f"feature id {largest} is out of range for an SAE with {sae.num_latents} latents"
            )


def check_top_k(features: FeatureSet, top_k: int) -> None:
    """Raise ValueError when a class of ``features`` has fewer than ``top_k`` features (top_k would silently
    take fewer)."""
    counts = [int(ids.numel()) for ids in features.ids]
    fewest = min(range(len(counts)), key=counts.__getitem__)
    if top_k > counts[fewest]:
        raise ValueError(
            f"top_k {top_k} asks for more features than this feature set has: class "
            f"{features.classes[fewest]!r} has {counts[fewest]}; lower top_k to {counts[fewest]} or find more "
            "features per class (Attribute Bias Features' top_k)"
        )


def probe_accuracy(features: FeatureSet) -> list[tuple[int, float]]:
    """(step, held-out probe accuracy) per step, from the provenance (empty for files without it)."""
    text = features.provenance.get("probe_accuracy", "")
    pairs = []
    for item in filter(None, text.split(",")):
        step, _, value = item.partition(":")
        try:
            pairs.append((int(step), float(value)))
        except ValueError:
            return []  # not written by this code: nothing to show
    return pairs


def feature_warnings(features: FeatureSet, top_k: int | None = None) -> list[str]:
    """What is wrong with the ``top_k`` best features of every class (all when None), in words.

    A top feature with a score of zero or below does not raise its class (the random control carries no
    scores and is not checked for them); a feature listed under several classes cannot tell them apart.
    The probe test's outcome is added when it was undecided.
    """
    warnings = []
    top = [ids[:top_k] for ids in features.ids]
    if features.method != "random":
        for name, scores in zip(features.classes, features.scores, strict=True):
            flat = int((scores[:top_k] <= 0).sum())
            if flat:
                warnings.append(f"class {name!r}: {flat} of its top {scores[:top_k].numel()} features have a "
                                "score of zero or less (they do not carry the class)")  # fmt: skip
    owners: dict[int, list[str]] = {}
    for name, ids in zip(features.classes, top, strict=True):
        for feature in ids.tolist():
            owners.setdefault(feature, []).append(name)
    shared = {f: names for f, names in owners.items() if len(names) > 1}
    if shared:
        listed = ", ".join(f"#{f} ({'/'.join(names)})" for f, names in sorted(shared.items())[:10])
        warnings.append(f"{len(shared)} feature(s) listed under several classes: {listed}")
    check = features.provenance.get("probe_check", "")
    if check.startswith("undecided"):
        warnings.append(f"probe test {check}")
    return warnings


def _check_class_tensors(name: str, ids: Tensor, scores: Tensor) -> None:
    where = f"FeatureSet class {name!r}"
    if not isinstance(ids, Tensor) or not isinstance(scores, Tensor):
        raise ValueError(
            f"{where}: ids and scores must be tensors, got {type(ids).__name__}, {type(scores).__name__}"
        )
    if ids.dtype != torch.int64 or ids.ndim != 1:
        raise ValueError(
            f"{where}: ids must be a 1-D int64 tensor, got {ids.dtype} of shape {tuple(ids.shape)}"
        )
    if scores.dtype != torch.float32 or scores.ndim != 1:
        raise ValueError(
            f"{where}: scores must be a 1-D float32 tensor, got {scores.dtype} of shape {tuple(scores.shape)}"
        )
    if ids.shape != scores.shape:
        raise ValueError(f"{where}: {ids.numel()} ids but {scores.numel()} scores; expected one score per id")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{where}: ids must be >= 0, found {int(ids.min())}")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"{where}: ids must be unique within a class, found a repeated id in {ids.tolist()}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{where}: scores must be finite, found {scores.tolist()}")
    if ids.numel() == 0:
        raise ValueError(f"{where}: has no features; a class without features edits nothing")
    if bool((scores[1:] > scores[:-1]).any()):
        raise ValueError(
            f"{where}: scores must be in descending order (best first, as top_k takes them), found "
            f"{scores.tolist()[:8]}{' ...' if scores.numel() > 8 else ''}"
        )


def save_features(features: FeatureSet, path: str | PathLike[str]) -> None:
    """Write ``features`` to one ``.safetensors`` file (atomically).

    Tensors ``ids.<i>`` (n_i,) int64 and ``scores.<i>`` (n_i,) float32 per class i; metadata: ``format``,
    ``format_version``, ``classes`` (JSON list), ``sae_fingerprint``, ``hook``, ``method``, ``provenance``
    (JSON object of strings).
    """
    tensors: dict[str, Tensor] = {}
    for i, (ids, scores) in enumerate(zip(features.ids, features.scores, strict=True)):
        # clone: rows of one ranking tensor share storage, which safetensors refuses to write
        tensors[f"ids.{i}"] = ids.detach().to("cpu").clone()
        tensors[f"scores.{i}"] = scores.detach().to("cpu").clone()
    metadata = {
        "format": FEATURES_FORMAT,
        "format_version": str(FEATURES_VERSION),
        "classes": json.dumps(list(features.classes)),
        "sae_fingerprint": features.sae_fingerprint,
        "hook": features.hook,
        "method": features.method,
        "provenance": json.dumps(dict(features.provenance), sort_keys=True),
    }
    write_safetensors(tensors, metadata, path)


def load_features(path: str | PathLike[str]) -> FeatureSet:
    """Read a feature set written by :func:`save_features`; ValueError naming the file on any defect."""
    tensors, metadata = read_safetensors(path)
    check_metadata_version(path, metadata, FEATURES_FORMAT, FEATURES_VERSION)
    try:
        classes = json.loads(metadata["classes"])
        provenance = json.loads(metadata.get("provenance", "{}"))
        fingerprint, hook, method = metadata["sae_fingerprint"], metadata["hook"], metadata["method"]
    except (KeyError, json.JSONDecodeError) as error:
        raise FormatError(f"{path}: feature-set metadata is incomplete or not valid JSON ({error})") from None
    if not isinstance(classes, list) or not isinstance(provenance, dict):
        raise FormatError(f"{path}: metadata 'classes' must be a JSON list and 'provenance' a JSON object")
    expected = {f"{kind}.{i}" for i in range(len(classes)) for kind in ("ids", "scores")}
    if set(tensors) != expected:
        raise FormatError(
            f"{path}: expected tensors {sorted(expected)} for {len(classes)} classes, found {sorted(tensors)}"
        )
    try:
        return FeatureSet(
            classes=tuple(classes),
            ids=tuple(tensors[f"ids.{i}"] for i in range(len(classes))),
            scores=tuple(tensors[f"scores.{i}"] for i in range(len(classes))),
            sae_fingerprint=fingerprint,
            hook=hook,
            method=method,
            provenance=provenance,
        )
    except ValueError as error:
        raise FormatError(f"{path}: {error}") from None


__all__ = ["FEATURES_FORMAT", "FEATURES_VERSION", "FeatureSet", "check_top_k", "feature_warnings",
           "load_features", "probe_accuracy", "save_features"]  # fmt: skip
