"""The bytes of a safetensors file, written and read without extra copies of the tensors.

Layout (the safetensors format): an 8-byte little-endian header length, the JSON header (tensor name ->
{"dtype", "shape", "data_offsets"}, and ``__metadata__``: string -> string), padded with spaces to a multiple
of 8 bytes, then the tensors' bytes back to back. Writing streams every tensor's memory straight to the file
(no serialized copy, no temporary file of its own: :func:`atomic.atomic_write` owns the only one).
Framing checks live in :func:`formats.read_header`; this module trusts the header it is given.

Digests: every file written records, in the metadata key ``digests`` (JSON), the SHA-256 of every tensor (of
``str(tuple(shape))`` followed by its bytes: for a float32 ``W_dec`` this is the SAE fingerprint's hash) and
of the header (the other metadata and every tensor's dtype and shape). Reading verifies them while the data
is read: the hashes run in worker threads (hashlib releases the GIL) while the next tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

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


DIGESTS_KEY = "digests"
"""Metadata key holding the digests: {"header": hex, "tensors": {name: hex}}."""
_CHUNK = 16 * 2**20


def tensor_digest(shape, data) -> str:
    """SHA-256 (hex) of ``str(tuple(shape))`` and then the bytes ``data`` (a buffer) of one tensor."""
    digest = hashlib.sha256(str(tuple(shape)).encode())
    digest.update(data)
    return digest.hexdigest()


def header_digest(metadata: Mapping[str, str], entries: Mapping[str, Mapping]) -> str:
    """SHA-256 (hex) of the metadata (without the digests) and every tensor's dtype and shape."""
    facts = {"metadata": {k: v for k, v in metadata.items() if k != DIGESTS_KEY},
             "tensors": {name: [entry["dtype"], list(entry["shape"])] for name, entry in entries.items()}}  # fmt: skip
    return hashlib.sha256(json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="digest")


def with_digests(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus the ``digests`` key for ``tensors`` (contiguous, on the CPU)."""
    entries = {name: {"dtype": DTYPE_NAMES.get(t.dtype, str(t.dtype)), "shape": list(t.shape)}
               for name, t in tensors.items()}  # fmt: skip
    with _pool() as pool:
        jobs = {name: pool.submit(tensor_digest, t.shape, byte_view(t)) for name, t in tensors.items()}
        digests = {name: job.result() for name, job in jobs.items()}
    record = {"header": header_digest(metadata, entries), "tensors": digests}
    return {
        **{k: v for k, v in metadata.items() if k != DIGESTS_KEY},
        DIGESTS_KEY: json.dumps(record, sort_keys=True),
    }


def _read_into(file, view: memoryview) -> None:
    done = 0
    while done < len(view):
        count = file.readinto(view[done : done + _CHUNK])
        if not count:
            raise EOFError("the file ended inside a tensor")
        done += count


def read_file(path: str, entries: Mapping[str, Mapping], data_start: int, *, digests: bool,
              keep: bool = True) -> tuple[dict[str, Tensor], dict[str, str] | None]:  # fmt: skip
    """The tensors of a checked header (one allocation each, read straight into it) and, with ``digests``,
    each one's :func:`tensor_digest`. ``keep=False`` only hashes, in bounded memory (nothing returned)."""
    tensors: dict[str, Tensor] = {}
    jobs: dict[str, Future] = {}
    order = sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0])
    with open(path, "rb") as file, _pool() as pool:
        for name, entry in order:
            begin, end = entry["data_offsets"]
            file.seek(data_start + begin)
            if keep:
                tensor = torch.empty(entry["shape"], dtype=TORCH_DTYPES[entry["dtype"]])
                view = memoryview(byte_view(tensor))
                _read_into(file, view)
                tensors[name] = tensor
                if digests:
                    jobs[name] = pool.submit(tensor_digest, entry["shape"], view)
            else:
                digest = hashlib.sha256(str(tuple(entry["shape"])).encode())
                buffer = bytearray(min(_CHUNK, end - begin))
                left = end - begin
                while left:
                    part = memoryview(buffer)[: min(left, len(buffer))]
                    _read_into(file, part)
                    digest.update(part)
                    left -= len(part)
                jobs[name] = _done(digest.hexdigest())
        found = {name: job.result() for name, job in jobs.items()} if digests else None
    return tensors, found


def _done(value: str) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


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


__all__ = [
    "DIGESTS_KEY",
    "DTYPE_NAMES",
    "TORCH_DTYPES",
    "byte_view",
    "header_digest",
    "read_file",
    "tensor_digest",
    "with_digests",
    "write_file",
]
