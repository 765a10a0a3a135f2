"""The bytes of a safetensors file, written and read without extra copies of the tensors.

Layout (the safetensors format): an 8-byte little-endian header length, the JSON header (tensor name ->
{"dtype", "shape", "data_offsets"}, and ``__metadata__``: string -> string), padded with spaces to a multiple
of 8 bytes, then the tensors' bytes back to back. Writing streams every tensor's memory straight to the file
(no serialized copy, no temporary file of its own: :func:`formats.atomic_write` owns the only one).
Framing checks live in :func:`formats.read_header`; this module trusts the header it is given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

TORCH_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in {"BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                       "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32",
                       "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64"}.items()
    if hasattr(torch, attr)
}  # fmt: skip
"""safetensors dtype name -> torch dtype (those this torch has)."""
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
"""torch dtype -> safetensors dtype name."""


def byte_view(tensor: Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a (nbytes,) uint8 array sharing its memory (no copy)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return np.zeros(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def write_file(path: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` (contiguous, on the CPU) and string ``metadata`` as a safetensors file at ``path``."""
    header: dict[str, object] = {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"tensor {name!r} must be contiguous and on the CPU to be written")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(len(raw).to_bytes(8, "little"))
        file.write(raw)
        for tensor in tensors.values():
            file.write(byte_view(tensor))
        file.flush()
        os.fsync(file.fileno())


__all__ = ["DTYPE_NAMES", "TORCH_DTYPES", "byte_view", "write_file"]
