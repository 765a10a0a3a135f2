"""SAE files: the native ``.safetensors`` format, and checked, atomic safetensors reading and writing.

Native SAE file: one ``.safetensors`` file with tensors ``W_enc``, ``W_dec`` ((L, d_in) or (L, d_in, K, K)),
``b_enc`` (L,) and ``b_dec`` (d_in,), and string metadata ``format`` (``diffbias.sae``), ``format_version``,
``d_in``, ``num_latents``, ``k``, ``kernel_size``, ``hook``, ``model_family``, ``dtype``, ``fingerprint`` and
``provenance`` (a JSON object of strings). Published layouts (sparsify, SAELens, DiffLens folders) are read
by ``importers.py``; :func:`load_sae` dispatches to them.

Every file is checked before safetensors parses it: the 8-byte header length and every tensor's data offsets
must fit in the file. Pickle-based files (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) are refused: loading them
can run code. Every error is a :class:`FormatError` naming the file, what was expected and what was found.
Every file written records a SHA-256 digest of each tensor and of the header (``tensorfile.py``); reading
verifies them (files without digests, from older versions or other tools, load as before).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..base import tensorfile
from ..base.atomic import atomic_write, check_writable_name, remove_stale_temporaries
from ..base.memory import check_fits
from ..base.tensorfile import (
    DIGESTS_KEY,
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    TORCH_DTYPES,
    FormatError,
    header_digest,
    read_file,
    refuse_pickle,
    with_digests,
    write_file,
)
from .model import WEIGHTS, SparseAutoencoder

SAE_FORMAT = "diffbias.sae"
"""Value of the ``format`` metadata key of a native SAE file."""
SAE_VERSION = 1
"""Version of the native SAE layout this code writes (and the newest it reads)."""
SAE_TENSORS = WEIGHTS
"""The native file's tensor names (those of :class:`SparseAutoencoder`)."""


def read_header(path: str | PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensor entries, metadata) of a checked safetensors header (:func:`~..base.tensorfile.read_header`)."""
    header = tensorfile.read_header(path)
    return header.entries, header.metadata


def read_safetensors(path: str | PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Checked load of a whole safetensors file to CPU, its digests verified when it has them: (tensors, metadata)."""
    tensors, metadata, _ = read_verified(path)
    return tensors, metadata


def _recorded_digests(path, header: Mapping[str, Any], metadata: Mapping[str, str]) -> dict[str, str] | None:
    """The recorded per-tensor digests after checking the header's own digest; None for a file without."""
    text = metadata.get(DIGESTS_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
        tensors, head = record["tensors"], record["header"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise FormatError(f"{path}: metadata {DIGESTS_KEY!r} is damaged (not the JSON this code writes)") from None
    if not isinstance(tensors, dict) or set(tensors) != set(header) or not isinstance(head, str):
        raise FormatError(
            f"{path}: the recorded digests name tensors {sorted(tensors) if isinstance(tensors, dict) else tensors!r}, "
            f"the file holds {sorted(header)}: the file was damaged"
        )
    if header_digest(metadata, header) != head:
        raise FormatError(
            f"{path}: the header (metadata, tensor dtypes or shapes) does not match its recorded digest: the "
            "file was damaged or edited; get a good copy again"
        )
    return tensors


def _compare_digests(path, recorded: Mapping[str, str], found: Mapping[str, str]) -> None:
    bad = sorted(name for name in recorded if recorded[name] != found.get(name))
    if bad:
        raise FormatError(
            f"{path}: the data of tensor(s) {bad} does not match the recorded digest: the file was damaged (a bad "
            "copy, download or disk); get a good copy again"
        )


def read_verified(path: str | PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str], dict[str, str] | None]:
    """:func:`read_safetensors` that also returns the verified per-tensor digests (None: the file has none)."""
    header, metadata, data_start = tensorfile.read_header(path)
    recorded = _recorded_digests(path, header, metadata)
    check_fits(sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()), f"loading {path}")
    try:
        tensors, found = read_file(os.fspath(path), header, data_start, digests=recorded is not None)
    except (OSError, EOFError, RuntimeError) as error:
        raise FormatError(f"{path}: could not be read as safetensors ({error})") from None
    if recorded is not None:
        _compare_digests(path, recorded, found)
    return tensors, metadata, recorded


def digest_status(path: str | PathLike[str]) -> str:
    """``ok`` when every digest of the file matches (read in bounded memory), ``no digest`` for a file written
    without them; FormatError naming what does not match."""
    header, metadata, data_start = tensorfile.read_header(path)
    recorded = _recorded_digests(path, header, metadata)
    if recorded is None:
        return "no digest"
    try:
        _, found = read_file(os.fspath(path), header, data_start, digests=True, keep=False)
    except (OSError, EOFError) as error:
        raise FormatError(f"{path}: could not be read ({error})") from None
    _compare_digests(path, recorded, found)
    return "ok"


def write_safetensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], path: str | PathLike[str]
) -> None:
    """Write a safetensors file atomically (see :func:`atomic_write`)."""
    refuse_pickle(Path(path))
    cpu = {name: tensor.detach().to("cpu") for name, tensor in tensors.items()}  # must be contiguous
    if not all(t.is_contiguous() for t in cpu.values()):
        raise ValueError(f"{path}: every tensor must be contiguous to be written")
    atomic_write(path, lambda temp: write_file(temp, cpu, with_digests(cpu, metadata)))


def check_metadata_version(
    path: str | PathLike[str], metadata: Mapping[str, str], fmt: str, version: int
) -> None:
    """Raise FormatError unless ``metadata`` names format ``fmt`` at a version this code reads (<= version)."""
    if metadata.get("format") != fmt:
        raise FormatError(f"{path}: metadata 'format' is {metadata.get('format')!r}, expected {fmt!r}")
    found = metadata.get("format_version", "")
    if not (found.isascii() and found.isdigit() and len(found) <= 9) or not 1 <= int(found) <= version:
        raise FormatError(
            f"{path}: format_version {found!r} of {fmt} is not readable here (this code reads versions 1 to "
            f"{version}); update diffbias"
        )


def check_weights(path: str | PathLike[str], tensors: Mapping[str, Tensor]) -> None:
    """Raise FormatError unless every tensor is floating point and finite (meta tensors: dtype only)."""
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{path}: tensor {name!r} is {tensor.dtype}, expected a floating dtype")
        if tensor.is_meta or _all_finite(tensor):
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        raise FormatError(f"{path}: tensor {name!r} holds {bad} non-finite values (NaN or inf)")


def _all_finite(tensor: Tensor) -> bool:
    """True when every value is finite, in chunks without a mask as large as the tensor: a chunk's float32 sum
    is finite unless it holds inf/NaN (or overflows: then its values are checked one by one)."""
    flat = tensor.reshape(-1)
    wide = torch.float64 if flat.dtype == torch.float64 else torch.float32
    for start in range(0, flat.numel(), 1 << 22):
        part = flat[start : start + (1 << 22)]
        if not torch.isfinite(part.sum(dtype=wide)) and not bool(torch.isfinite(part).all()):
            return False
    return True


def expect_shapes(
    path: str | PathLike[str], tensors: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Raise FormatError unless ``tensors`` holds exactly the names of ``shapes`` with those shapes.

    ``tensors`` values may be tensors or header entries (with a ``shape`` list).
    """
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise FormatError(
            f"{path}: missing tensor(s) {missing}; expected {list(shapes)}, found {sorted(tensors)}"
        )
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise FormatError(f"{path}: unexpected tensor(s) {extra}; expected exactly {list(shapes)}")
    for name, shape in shapes.items():
        value = tensors[name]
        found = tuple(value.shape) if isinstance(value, Tensor) else tuple(value["shape"])
        if found != tuple(shape):
            raise FormatError(f"{path}: tensor {name!r} has shape {found}, expected {tuple(shape)}")


def meta_tensors(header: Mapping[str, Mapping[str, Any]]) -> dict[str, Tensor]:
    """Data-less (meta device) tensors with the dtypes and shapes of a header, for cheap shape checks."""
    return {
        name: torch.empty(entry["shape"], dtype=TORCH_DTYPES[entry["dtype"]], device="meta")
        for name, entry in header.items()
    }


# ---------------------------------------------------------------------------------------- native SAE files
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
    header, metadata = read_header(path)
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
        raise FormatError(f"{path}: metadata 'provenance' must be a JSON object of strings, found {provenance!r:.200}")
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
    ``dtype``/``device``: convert after loading (default: the file's dtype, CPU).
    """
    from .importers import import_folder, layout_folder

    path = Path(path)
    refuse_pickle(path)
    folder = layout_folder(path)
    if folder is not None:
        sae = import_folder(folder, load=True)
    else:
        sae = _load_native(path, *_read_native_header(path))
    if hook is not None:
        sae.hook = hook
    if model_family is not None:
        sae.model_family = model_family
    return sae.to(device=device, dtype=dtype)


def sae_metadata(path: str | PathLike[str]) -> dict[str, str]:
    """The metadata of an SAE file or folder, reading only headers and ``cfg.json`` (cheap, for listings).

    Native files: their stored metadata. Imported layouts: the same keys as a native file (``format`` names
    the layout, e.g. ``sparsify``; no ``format_version``, and no ``fingerprint``, which needs the weights).
    """
    from .importers import import_folder, layout_folder

    path = Path(path)
    refuse_pickle(path)
    folder = layout_folder(path)
    if folder is not None:
        sae = import_folder(folder, load=False)
        metadata = {**sae_file_metadata(sae, fingerprint=False), "format": sae.provenance["imported_from"]}
        del metadata["format_version"]  # the native layout's version says nothing about an imported one
        return metadata
    header, metadata = _read_native_header(path)
    k, provenance = _native_parts(path, header, metadata)
    build_sae(path, meta_tensors(header), k, metadata.get("hook", "unknown"), metadata.get("model_family", "unknown"),
              provenance)  # fmt: skip  (checks what a load checks, without the data)
    return dict(metadata)


__all__ = [
    "MAX_HEADER_BYTES",
    "PICKLE_SUFFIXES",
    "SAE_FORMAT",
    "SAE_VERSION",
    "FormatError",
    "atomic_write",
    "check_metadata_version",
    "check_writable_name",
    "digest_status",
    "load_sae",
    "read_header",
    "read_safetensors",
    "read_verified",
    "refuse_pickle",
    "remove_stale_temporaries",
    "sae_metadata",
    "save_sae",
    "write_safetensors",
]
