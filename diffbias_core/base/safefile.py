"""Checked, verified and atomic safetensors files: what every file format of diffbias reads and writes with.

Reading checks the framing first (:func:`~.tensorfile.read_header`), then the recorded digests while the data
is read (files without digests, from older versions or other tools, load as before). Writing goes to a
temporary file renamed into place when complete (:func:`~.atomic.atomic_write`) and records the digests.
Every error is a :class:`~.tensorfile.FormatError` naming the file, what was expected and what was found.
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

from .atomic import atomic_write
from .memory import check_fits
from .tensorfile import (
    DIGESTS_KEY,
    FLOAT_DTYPES,
    TORCH_DTYPES,
    FormatError,
    header_digest,
    read_file,
    read_header,
    refuse_pickle,
    with_digests,
    write_file,
)


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
        raise FormatError(
            f"{path}: metadata {DIGESTS_KEY!r} is damaged (not the JSON this code writes)"
        ) from None
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


def read_verified(
    path: str | PathLike[str],
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, str] | None]:
    """:func:`read_safetensors` that also returns the verified per-tensor digests (None: the file has none)."""
    header, metadata, data_start = read_header(path)
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
    header, metadata, data_start = read_header(path)
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


__all__ = [
    "check_metadata_version",
    "check_weights",
    "digest_status",
    "expect_shapes",
    "meta_tensors",
    "read_safetensors",
    "read_verified",
    "write_safetensors",
]
