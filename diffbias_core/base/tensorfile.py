"""The bytes of a safetensors file: its checked header, and its tensors written and read without extra copies.

Layout (the safetensors format): an 8-byte little-endian header length, the JSON header (tensor name ->
{"dtype", "shape", "data_offsets"}, and ``__metadata__``: string -> string), padded with spaces to a multiple
of 8 bytes, then the tensors' bytes back to back. Writing streams every tensor's memory straight to the file
(no serialized copy, no temporary file of its own: :func:`atomic.atomic_write` owns the only one).
:func:`read_header` is the one place that parses and checks a header (framing, dtypes, offsets); the
readers below trust the header it returned.

Digests: every file written records, in the metadata key ``digests`` (JSON), the SHA-256 of every tensor (of
``str(tuple(shape))`` followed by its bytes: for a float32 ``W_dec`` this is the SAE fingerprint's hash) and
of the header (the other metadata and every tensor's dtype and shape). Reading verifies them while the data
is read: the hashes run in worker threads (hashlib releases the GIL) while the next tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor


class Dtype(NamedTuple):
    """One safetensors dtype: its torch dtype, its size, and the numpy dtype its bytes are read as
    (a same-width integer where numpy has no such float: bfloat16, float8)."""

    torch: torch.dtype
    itemsize: int
    numpy: type


DTYPES = {
    name: Dtype(getattr(torch, attr), size, numpy)
    for name, (attr, size, numpy) in {
        "BOOL": ("bool", 1, np.bool_), "U8": ("uint8", 1, np.uint8), "I8": ("int8", 1, np.int8),
        "F8_E4M3": ("float8_e4m3fn", 1, np.uint8), "F8_E5M2": ("float8_e5m2", 1, np.uint8),
        "I16": ("int16", 2, np.int16), "U16": ("uint16", 2, np.uint16), "F16": ("float16", 2, np.float16),
        "BF16": ("bfloat16", 2, np.uint16), "I32": ("int32", 4, np.int32), "U32": ("uint32", 4, np.uint32),
        "F32": ("float32", 4, np.float32), "I64": ("int64", 8, np.int64), "U64": ("uint64", 8, np.uint64),
        "F64": ("float64", 8, np.float64),
    }.items()
    if hasattr(torch, attr)
}  # fmt: skip
"""The one dtype table: safetensors dtype name -> :class:`Dtype` (those this torch has)."""
TORCH_DTYPES = {name: dtype.torch for name, dtype in DTYPES.items()}
"""safetensors dtype name -> torch dtype."""
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
"""torch dtype -> safetensors dtype name."""
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
"""The dtypes SAE and probe weights may have."""


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
"""File suffixes of pickle-based checkpoints, which are never loaded."""
MAX_HEADER_BYTES = 100 * 2**20
"""Largest safetensors JSON header accepted."""


class FormatError(ValueError):
    """A file is missing, damaged, unsafe or not in an expected layout; the message names the file."""


# ---------------------------------------------------------------------------------------- the header
def refuse_pickle(path: Path) -> None:
    """Raise FormatError if ``path`` names a pickle-based checkpoint (by suffix)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(
            f"{path}: refusing to load a pickle-based '{path.suffix}' file: unpickling can run arbitrary code "
            "hidden in the file. Convert it to .safetensors where you trust it (for example "
            "safetensors.torch.save_file(state_dict, 'sae.safetensors')) and load that instead."
        )


class Header(NamedTuple):
    """A checked safetensors header.

    entries: tensor name -> {"dtype", "shape", "data_offsets"} (offsets from ``data_start``), in file order
    of the JSON. metadata: the ``__metadata__`` strings ({} when absent). data_start: byte offset of the
    first tensor byte in the file (8 + the header length).
    """

    entries: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    data_start: int


def read_header(path: str | PathLike[str]) -> Header:
    """Check a safetensors file's framing and return its :class:`Header` without reading tensor data.

    The one reader of safetensors headers: every dtype must be one of :data:`DTYPES`, every tensor's bytes
    must lie inside the file, back to back. Raises FormatError for a missing, truncated or malformed file,
    a pickle, or offsets beyond the end of the file.
    """
    path = Path(path)
    refuse_pickle(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(8)
            declared = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = file.read(declared) if 0 <= declared <= min(size - 8, MAX_HEADER_BYTES) else b""
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a folder, expected a .safetensors file") from None
    except OSError as error:  # a symlink loop, no permission, an I/O error
        raise FormatError(f"{path}: cannot be read ({error.strerror or error})") from None
    if declared < 0:
        raise FormatError(f"{path}: truncated: {size} bytes, expected at least the 8-byte header length")
    if declared > size - 8 and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise FormatError(
            f"{path}: this is a pickle/zip checkpoint named like safetensors; refusing it, because unpickling "
            "can run arbitrary code hidden in the file. Convert it to real .safetensors where you trust it."
        )
    # never quote `declared`: for a file that is not safetensors it is 8 bytes of that file's content
    if declared > size - 8:
        raise FormatError(
            f"{path}: header declares more bytes than the {size - 8} that follow the length field "
            "(truncated, or not a safetensors file)"
        )
    if declared > MAX_HEADER_BYTES:
        raise FormatError(
            f"{path}: header exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:  # ValueError: JSONDecodeError, an integer too long
        raise FormatError(f"{path}: header is not valid JSON ({error}); not a safetensors file?") from None
    except RecursionError:
        raise FormatError(f"{path}: header is JSON nested too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings, found {metadata!r}")
    for name, entry in header.items():
        _check_entry(path, name, entry, size - 8 - declared)
    _check_layout(path, header, size - 8 - declared)
    return Header(header, metadata, 8 + declared)


def _check_layout(path: Path, header: Mapping[str, Any], data_bytes: int) -> None:
    """The tensors' bytes must lie back to back from the start of the data to its end (safetensors' rule):
    no two tensors share bytes, nothing is left between or after them."""
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, stop = entry["data_offsets"]
        if begin < end:
            raise FormatError(
                f"{path}: tensor {name!r} at bytes [{begin}, {stop}) overlaps another tensor's bytes"
            )
        if begin > end:
            raise FormatError(f"{path}: {begin - end} data bytes before tensor {name!r} belong to no tensor")
        end = stop
    if end != data_bytes:
        raise FormatError(f"{path}: {data_bytes - end} data bytes after the last tensor belong to no tensor")


def _check_entry(path: Path, name: str, entry: Any, data_bytes: int) -> None:
    try:
        dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise FormatError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
    if dtype not in DTYPES:
        raise FormatError(
            f"{path}: tensor {name!r} has unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}"
        )
    if not all(isinstance(n, int) and n >= 0 for n in shape) or not all(
        isinstance(n, int) for n in (begin, end)
    ):
        raise FormatError(f"{path}: tensor {name!r} has an invalid shape {shape} or offsets {[begin, end]}")
    if not 0 <= begin <= end or end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise FormatError(
            f"{path}: tensor {name!r} ({dtype}, shape {shape}) needs {math.prod(shape) * DTYPES[dtype].itemsize} "
            f"bytes but its offsets [{begin}, {end}) hold {end - begin}"
        )
    if end > data_bytes:
        raise FormatError(
            f"{path}: tensor {name!r} ends at byte {end} of the data, but the file holds only {data_bytes} "
            "data bytes (truncated download?)"
        )


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
    "DTYPES",
    "DTYPE_NAMES",
    "FLOAT_DTYPES",
    "MAX_HEADER_BYTES",
    "PICKLE_SUFFIXES",
    "TORCH_DTYPES",
    "Dtype",
    "FormatError",
    "Header",
    "byte_view",
    "header_digest",
    "read_file",
    "read_header",
    "refuse_pickle",
    "tensor_digest",
    "with_digests",
    "write_file",
]
