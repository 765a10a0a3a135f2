"""SAE files: :func:`load_sae` for every layout, and the names of the file modules in one place.

Native SAE file (:mod:`.native`): one ``.safetensors`` file with tensors ``W_enc``, ``W_dec`` ((L, d_in) or
(L, d_in, K, K)), ``b_enc`` (L,) and ``b_dec`` (d_in,), and string metadata ``format`` (``diffbias.sae``),
``format_version``, ``d_in``, ``num_latents``, ``k``, ``kernel_size``, ``hook``, ``model_family``, ``dtype``,
``fingerprint`` and ``provenance`` (a JSON object of strings). Published layouts (sparsify, SAELens, DiffLens
folders) are read by :mod:`.importers`; :func:`load_sae` dispatches to them.

Every file is checked before safetensors parses it (:func:`~..base.tensorfile.read_header`): the 8-byte header
length and every tensor's data offsets must fit in the file. Pickle-based files (``.pt``, ``.pth``, ``.ckpt``,
``.bin``) are refused: loading them can run code. Every error is a :class:`FormatError` naming the file, what
was expected and what was found. Every file written records a SHA-256 digest of each tensor and of the header
(:mod:`~..base.tensorfile`); reading verifies them (:mod:`~..base.safefile`; files without digests, from older
versions or other tools, load as before).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import torch

from ..base import tensorfile
from ..base.atomic import atomic_write, check_writable_name, remove_stale_temporaries
from ..base.safefile import (
    check_metadata_version,
    check_weights,
    digest_status,
    expect_shapes,
    meta_tensors,
    read_safetensors,
    read_verified,
    write_safetensors,
)
from ..base.tensorfile import MAX_HEADER_BYTES, PICKLE_SUFFIXES, FormatError, refuse_pickle
from .importers import import_folder, layout_folder
from .model import SparseAutoencoder
from .native import (
    SAE_FORMAT,
    SAE_TENSORS,
    SAE_VERSION,
    build_sae,
    load_native,
    native_metadata,
    sae_file_metadata,
    save_sae,
)


def read_header(path: str | PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensor entries, metadata) of a checked safetensors header (:func:`~..base.tensorfile.read_header`)."""
    header = tensorfile.read_header(path)
    return header.entries, header.metadata


def load_sae(
    path: str | PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    hook: str | None = None,
    model_family: str | None = None,
) -> SparseAutoencoder:
    """Load an SAE from a native file or a published folder layout (sparsify, SAELens, DiffLens).

    A layout's weight file (``sae.safetensors``, ``sae_weights.safetensors``) loads its folder.
    ``hook``/``model_family`` override what the file records (imported layouts rarely record ours).
    ``dtype``/``device``: convert after loading (default: the file's dtype, CPU), with
    :meth:`~.model.SparseAutoencoder.copy_to` (the fingerprint stays the file's).
    """
    path = Path(path)
    refuse_pickle(path)
    folder = layout_folder(path)
    if folder is not None:
        sae = import_folder(folder, load=True)
    else:
        sae = load_native(path)
    if hook is not None:
        sae.hook = hook
    if model_family is not None:
        sae.model_family = model_family
    if (device is not None and torch.device(device) != sae.device) or (
        dtype is not None and dtype != sae.dtype
    ):
        sae = sae.copy_to(device, dtype)  # keeps the file's fingerprint, also in another precision
    return sae


def sae_metadata(path: str | PathLike[str]) -> dict[str, str]:
    """The metadata of an SAE file or folder, reading only headers and ``cfg.json`` (cheap, for listings).

    Native files: their stored metadata. Imported layouts: the same keys as a native file (``format`` names
    the layout, e.g. ``sparsify``; no ``format_version``, and no ``fingerprint``, which needs the weights).
    """
    path = Path(path)
    refuse_pickle(path)
    folder = layout_folder(path)
    if folder is not None:
        sae = import_folder(folder, load=False)
        metadata = {**sae_file_metadata(sae, fingerprint=False), "format": sae.provenance["imported_from"]}
        del metadata["format_version"]  # the native layout's version says nothing about an imported one
        return metadata
    return native_metadata(path)


__all__ = [
    "MAX_HEADER_BYTES",
    "PICKLE_SUFFIXES",
    "SAE_FORMAT",
    "SAE_TENSORS",
    "SAE_VERSION",
    "FormatError",
    "atomic_write",
    "build_sae",
    "check_metadata_version",
    "check_weights",
    "check_writable_name",
    "digest_status",
    "expect_shapes",
    "load_sae",
    "meta_tensors",
    "read_header",
    "read_safetensors",
    "read_verified",
    "refuse_pickle",
    "remove_stale_temporaries",
    "sae_file_metadata",
    "sae_metadata",
    "save_sae",
    "write_safetensors",
]
