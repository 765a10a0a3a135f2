"""The native SAE file: one ``.safetensors`` file (the layout is described in :mod:`.formats`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..base.safefile import (
    check_metadata_version,
    check_weights,
    expect_shapes,
    meta_tensors,
    read_verified,
    write_safetensors,
)
from ..base.tensorfile import FormatError, read_header
from .model import WEIGHTS, SparseAutoencoder

SAE_FORMAT = "diffbias.sae"
"""Value of the ``format`` metadata key of a native SAE file."""
SAE_VERSION = 1
"""Version of the native SAE layout this code writes (and the newest it reads)."""
SAE_TENSORS = WEIGHTS
"""The native file's tensor names (those of :class:`SparseAutoencoder`)."""


def sae_file_metadata(sae: SparseAutoencoder, *, fingerprint: bool = True) -> dict[str, str]:
    """The native metadata describing ``sae`` (string values)."""
    metadata = {
        "format": SAE_FORMAT,
        "format_version": str(SAE_VERSION),
        "d_in": str(sae.d_in),
        "num_latents": str(sae.num_latents),
        "k": str(sae.k),
        "kernel_size": str(sae.kernel_size),
        "hook": sae.hook,
        "model_family": sae.model_family,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "provenance": json.dumps(sae.provenance, sort_keys=True),
    }
    if fingerprint:
        metadata["fingerprint"] = sae.fingerprint()
    return metadata


def save_sae(sae: SparseAutoencoder, path: str | PathLike[str]) -> None:
    """Write ``sae`` as one native ``.safetensors`` file (atomically)."""
    tensors = {name: getattr(sae, name).detach().to("cpu").contiguous() for name in SAE_TENSORS}
    write_safetensors(tensors, sae_file_metadata(sae), path)


def _int_field(path: Path, metadata: Mapping[str, str], key: str) -> int:
    value = metadata.get(key, "")
    if not (value.isascii() and value.isdigit() and len(value) <= 18) or int(value) < 1:
        raise FormatError(f"{path}: metadata {key!r} must be a positive integer, found {value!r}")
    return int(value)


def _native_sizes(path: Path, metadata: Mapping[str, str]) -> tuple[int, int, int, int]:
    check_metadata_version(path, metadata, SAE_FORMAT, SAE_VERSION)
    return tuple(_int_field(path, metadata, key) for key in ("d_in", "num_latents", "k", "kernel_size"))  # type: ignore[return-value]


def _read_native_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    header, metadata, _ = read_header(path)
    if metadata.get("format") != SAE_FORMAT:
        raise FormatError(
            f"{path}: unknown layout: metadata 'format' is {metadata.get('format')!r}, expected "
            f"{SAE_FORMAT!r}; for a sparsify, SAELens or DiffLens SAE give the folder holding its cfg.json"
        )
    return header, metadata


def _native_parts(path: Path, header: dict[str, Any], metadata: dict[str, str]) -> tuple[int, dict[str, str]]:
    """(k, provenance) of a native header, after checking its sizes against the tensor shapes."""
    d_in, num_latents, k, kernel_size = _native_sizes(path, metadata)
    kernel = (kernel_size, kernel_size) if kernel_size > 1 else ()
    expect_shapes(path, header, {"W_enc": (num_latents, d_in, *kernel), "b_enc": (num_latents,),
                                 "W_dec": (num_latents, d_in, *kernel), "b_dec": (d_in,)})  # fmt: skip
    try:
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (ValueError, RecursionError) as error:
        raise FormatError(f"{path}: metadata 'provenance' is not valid JSON ({error})") from None
    if not isinstance(provenance, dict) or not all(isinstance(v, str) for v in provenance.values()):
        raise FormatError(
            f"{path}: metadata 'provenance' must be a JSON object of strings, found {provenance!r:.200}"
        )
    return k, provenance


def _load_native(path: Path, header: dict[str, Any], metadata: dict[str, str]) -> SparseAutoencoder:
    k, provenance = _native_parts(path, header, metadata)
    tensors, _, digests = read_verified(path)
    sae = build_sae(path, tensors, k, metadata.get("hook", "unknown"), metadata.get("model_family", "unknown"),
                    provenance)  # fmt: skip
    if digests is not None:  # verified: the decoder's digest is its fingerprint's hash for float32 weights
        known = digests["W_dec"][:16] if sae.W_dec.dtype == torch.float32 else metadata.get("fingerprint")
        sae.set_known_fingerprint(known)
    stored = metadata.get("fingerprint")
    if stored is not None and stored != sae.fingerprint():
        raise FormatError(
            f"{path}: decoder fingerprint {sae.fingerprint()} does not match the recorded {stored}; "
            "the file was damaged or its weights were changed"
        )
    return sae


def load_native(path: Path) -> SparseAutoencoder:
    """Load a native SAE file (its header, sizes, digests and fingerprint checked)."""
    return _load_native(path, *_read_native_header(path))


def native_metadata(path: Path) -> dict[str, str]:
    """The stored metadata of a native SAE file, after the checks a load makes, without reading the data."""
    header, metadata = _read_native_header(path)
    k, provenance = _native_parts(path, header, metadata)
    hook, family = metadata.get("hook", "unknown"), metadata.get("model_family", "unknown")
    build_sae(path, meta_tensors(header), k, hook, family, provenance)
    return dict(metadata)


def build_sae(
    path: str | PathLike[str], tensors: Mapping[str, Tensor], k: int, hook: str, model_family: str,
    provenance: Mapping[str, Any],
) -> SparseAutoencoder:  # fmt: skip
    """An SAE from canonical tensors (``SAE_TENSORS``), with the file named in every error."""
    check_weights(path, tensors)
    dtype = tensors["W_dec"].dtype
    try:
        return SparseAutoencoder.from_weights(
            *(tensors[name].to(dtype) for name in SAE_TENSORS), k,
            hook=hook, model_family=model_family, provenance=provenance,
        )  # fmt: skip
    except (ValueError, TypeError) as error:
        raise FormatError(f"{path}: {error}") from None


__all__ = [
    "SAE_FORMAT",
    "SAE_TENSORS",
    "SAE_VERSION",
    "build_sae",
    "load_native",
    "native_metadata",
    "sae_file_metadata",
    "save_sae",
]
