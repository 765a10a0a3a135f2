"""The linear probe's file: one ``.safetensors`` file, written atomically through ``formats``.

Tensors ``weight`` (C, D), ``bias`` (C,), ``mean`` (D,), ``scale`` (D,), optional ``reference_embedding``
(D,) (the vision model's embedding of ``reference_image()``, to recognise the model later); string metadata
``format`` (``diffbias.classifier``), ``format_version``, ``classes`` (JSON list), ``embedding_width``,
``vision_model`` and ``provenance`` (JSON object).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from typing import Any

import torch

from ..base.safefile import (
    check_metadata_version,
    check_weights,
    expect_shapes,
    read_safetensors,
    write_safetensors,
)
from ..base.tensorfile import FormatError, read_header
from .classifier import LinearProbe

CLASSIFIER_FORMAT = "diffbias.classifier"
"""Value of the ``format`` metadata key of a classifier file."""
CLASSIFIER_VERSION = 1
"""Version of the classifier layout this code writes (and the newest it reads)."""


def save_probe(probe: LinearProbe, path: str | PathLike[str]) -> None:
    """Write ``probe`` as one ``.safetensors`` file (atomically)."""
    tensors = {"weight": probe.weight, "bias": probe.bias, "mean": probe.mean, "scale": probe.scale}
    if probe.reference_embedding is not None:
        tensors["reference_embedding"] = probe.reference_embedding
    metadata = {
        "format": CLASSIFIER_FORMAT,
        "format_version": str(CLASSIFIER_VERSION),
        "classes": json.dumps(list(probe.classes)),
        "embedding_width": str(probe.embedding_width),
        "vision_model": probe.vision_model,
        "provenance": json.dumps(dict(probe.provenance), sort_keys=True),
    }
    write_safetensors({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
                      metadata, path)  # fmt: skip


def _json_field(path: Any, metadata: Mapping[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(metadata.get(key, ""))
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, kind):
        raise FormatError(
            f"{path}: metadata {key!r} must be a JSON {kind.__name__}, found {metadata.get(key)!r}"
        )
    return value


def load_probe(path: str | PathLike[str]) -> LinearProbe:
    """Load a classifier file written by :func:`save_probe`; FormatError naming the file on any problem."""
    header, metadata, _ = read_header(path)
    check_metadata_version(path, metadata, CLASSIFIER_FORMAT, CLASSIFIER_VERSION)
    classes = _json_field(path, metadata, "classes", list)
    if (
        len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise FormatError(f"{path}: metadata 'classes' must list >= 2 distinct names, found {classes!r}")
    width = metadata.get("embedding_width", "")
    if not width.isdigit() or int(width) < 1:
        raise FormatError(f"{path}: metadata 'embedding_width' must be a positive integer, found {width!r}")
    c, d = len(classes), int(width)
    shapes = {"weight": (c, d), "bias": (c,), "mean": (d,), "scale": (d,)}
    if "reference_embedding" in header:
        shapes["reference_embedding"] = (d,)
    expect_shapes(path, header, shapes)
    tensors, _ = read_safetensors(path)
    check_weights(path, tensors)
    if (tensors["scale"] <= 0).any():
        raise FormatError(f"{path}: tensor 'scale' must be > 0 everywhere")
    return LinearProbe(
        tuple(classes), *(tensors[k].float() for k in ("weight", "bias", "mean", "scale")),
        metadata.get("vision_model", "unknown"),
        tensors["reference_embedding"].float() if "reference_embedding" in tensors else None,
        _json_field(path, metadata, "provenance", dict),
    )  # fmt: skip


__all__ = ["CLASSIFIER_FORMAT", "CLASSIFIER_VERSION", "load_probe", "save_probe"]
