"""An SAE file opened without its weights: sizes and names from the header, decoder rows read on demand.

:func:`open_sae` reads only the header (and ``cfg.json`` for a published layout) and checks what
:func:`formats.sae_metadata` checks. An edit that needs only some decoder rows reads those rows straight from
the file (:meth:`SaeHandle.decoder_rows`); an edit that needs the encoder, a training or an attribution calls
:meth:`SaeHandle.load` for the whole SAE (once; the handle keeps it).

Integrity of what is read: the decoder is verified before its first row is used. A native file with digests
has its header digest checked and its whole ``W_dec`` hashed against the recorded digest, streamed in chunks
(1 MiB at a time, whatever the file's size), together with a finiteness check; the fingerprint then is
the recorded one (which the verified header covers). A file without digests has its fingerprint computed from
the same stream and compared with the recorded one when there is one. The encoder and biases are not read,
so damage there shows only when the whole SAE is loaded.

Rows are read directly from native, sparsify and DiffLens (kernel > 1) files, whose decoder rows lie
contiguous in the file. SAELens (whose rows are folded with per-latent factors) and DiffLens kernel-1 (whose
decoder is stored transposed) SAEs are loaded whole on the first row request.
"""

from __future__ import annotations

import hashlib
import logging
import math
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..base.safefile import _all_finite, _recorded_digests, meta_tensors
from ..base.tensorfile import TORCH_DTYPES, FormatError, byte_view, read_header, refuse_pickle
from .formats import load_sae
from .importers import _detect, import_folder, layout_folder
from .model import SparseAutoencoder
from .native import _native_parts, _read_native_header, build_sae

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 2**20
_ROW_TENSOR = {"native": "W_dec", "sparsify": "W_dec", "difflens": "decoder.weight"}
"""The tensor whose rows are the canonical decoder rows, per layout (DiffLens: only for kernel > 1)."""


class SaeHandle:
    """An SAE known by its file: the facts of :class:`SparseAutoencoder` without its weights.

    ``d_in``, ``num_latents``, ``k``, ``kernel_size``, ``n_in``, ``hook``, ``model_family``, ``provenance`` and
    ``dtype`` are read from the header; :meth:`fingerprint` verifies the decoder (streamed once).
    Build with :func:`open_sae` (a file) or :meth:`of` (an SAE already in memory).
    """

    def __init__(self, skeleton: SparseAutoencoder, path: Path | None, layout: str, loaded=None) -> None:
        self._skeleton = skeleton  # on the meta device: sizes, hook, family, provenance
        self.path = path
        self.layout = layout
        self._loaded: SparseAutoencoder | None = loaded
        self._fingerprint: str | None = None

    @classmethod
    def of(cls, sae: SparseAutoencoder) -> SaeHandle:
        """A handle on an SAE in memory (rows and fingerprint come from it)."""
        return cls(sae, None, "memory", loaded=sae)

    # ------------------------------------------------------------------ facts
    d_in = property(lambda self: self._skeleton.d_in)
    num_latents = property(lambda self: self._skeleton.num_latents)
    k = property(lambda self: self._skeleton.k)
    kernel_size = property(lambda self: self._skeleton.kernel_size)
    n_in = property(lambda self: self._skeleton.n_in)
    hook = property(lambda self: self._skeleton.hook)
    model_family = property(lambda self: self._skeleton.model_family)
    provenance = property(lambda self: self._skeleton.provenance)
    dtype = property(lambda self: self._skeleton.dtype)

    @property
    def is_loaded(self) -> bool:
        """True once the whole SAE is in memory."""
        return self._loaded is not None

    # ------------------------------------------------------------------ weights
    def load(self) -> SparseAutoencoder:
        """The whole SAE (read and verified once, then kept), with this handle's hook and family."""
        if self._loaded is None:
            logger.info("loading the whole SAE %s", self.path)
            sae = load_sae(self.path, hook=self.hook, model_family=self.model_family)
            self._loaded = sae
        return self._loaded

    def fingerprint(self) -> str:
        """:meth:`SparseAutoencoder.fingerprint` of the decoder, after verifying it (see the module doc)."""
        if self._fingerprint is None:
            if self._loaded is not None or self.layout not in _ROW_TENSOR or self._row_tensor() is None:
                self._fingerprint = self.load().fingerprint()
            else:
                self._fingerprint = self._verify_decoder()
        return self._fingerprint

    def decoder_rows(self, ids: Tensor) -> Tensor:
        """(U, n_in) decoder rows of latents ``ids`` (U,) int64, in the SAE's dtype, on the CPU (verified first)."""
        ids = ids.reshape(-1).to("cpu", torch.int64)
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.num_latents):
            raise ValueError(f"latent ids must lie in [0, {self.num_latents}), got {ids.tolist()}")
        self.fingerprint()
        if self._loaded is not None or self._row_tensor() is None:
            return self.load().w_dec_flat.detach()[ids].clone()
        name, entry, start = self._row_tensor()
        out = torch.empty(ids.numel(), self.n_in, dtype=TORCH_DTYPES[entry["dtype"]])  # (U, n_in)
        row_bytes = self.n_in * out.element_size()
        view = memoryview(byte_view(out))
        with open(self.path, "rb") as file:
            for i, latent in enumerate(ids.tolist()):
                file.seek(start + entry["data_offsets"][0] + latent * row_bytes)
                if file.readinto(view[i * row_bytes : (i + 1) * row_bytes]) != row_bytes:
                    raise FormatError(f"{self.path}: the file ended inside row {latent} of tensor {name!r}")
        return out.to(self.dtype)

    # ------------------------------------------------------------------ file access
    def _row_tensor(self) -> tuple[str, dict[str, Any], int] | None:
        """(name, header entry, data start) of the tensor holding contiguous decoder rows, or None."""
        if self.layout not in _ROW_TENSOR or (self.layout == "difflens" and self.kernel_size == 1):
            return None
        header = read_header(self.path)
        name = _ROW_TENSOR[self.layout]
        return name, header.entries[name], header.data_start

    def _verify_decoder(self) -> str:
        """Stream the decoder once: its recorded digest (native files with digests), finiteness, fingerprint."""
        header, metadata, _ = read_header(self.path)
        recorded = _recorded_digests(self.path, header, metadata) if self.layout == "native" else None
        name, entry, start = self._row_tensor()
        shape, dtype = tuple(entry["shape"]), TORCH_DTYPES[entry["dtype"]]
        raw = hashlib.sha256(str(shape).encode())
        # what SparseAutoencoder.fingerprint hashes: float32 rows (for a float32 file the same bytes as raw)
        wide = raw if dtype == torch.float32 else hashlib.sha256(str(shape).encode())
        row_elems = math.prod(shape[1:])
        rows_per_chunk = max(1, _CHUNK_BYTES // max(1, row_elems * 4))
        buffer = torch.empty(
            min(rows_per_chunk, shape[0]), row_elems, dtype=dtype
        )  # reused: memory stays small
        with open(self.path, "rb") as file:
            file.seek(start + entry["data_offsets"][0])
            for first in range(0, shape[0], rows_per_chunk):
                chunk = buffer[: min(rows_per_chunk, shape[0] - first)]
                view = memoryview(byte_view(chunk))
                if file.readinto(view) != len(view):
                    raise FormatError(f"{self.path}: the file ended inside tensor {name!r}")
                raw.update(view)
                if not _all_finite(chunk):
                    raise FormatError(f"{self.path}: tensor {name!r} holds non-finite values (NaN or inf)")
                if wide is not raw:
                    wide.update(chunk.to(torch.float32).numpy())
        stored = metadata.get("fingerprint") if self.layout == "native" else None
        if recorded is not None and recorded[name] != raw.hexdigest():
            raise FormatError(
                f"{self.path}: the data of tensor(s) [{name!r}] does not match the recorded digest: the file was "
                "damaged (a bad copy, download or disk); get a good copy again"
            )
        value = wide.hexdigest()[:16]
        if stored is not None and stored != value:
            raise FormatError(
                f"{self.path}: decoder fingerprint {value} does not match the recorded {stored}; "
                "the file was damaged or its weights were changed"
            )
        return value


def open_sae(
    path: str | PathLike[str], *, hook: str | None = None, model_family: str | None = None
) -> SaeHandle:
    """Open an SAE file or published folder without reading its weights (see :class:`SaeHandle`).

    Raises FormatError for what :func:`formats.sae_metadata` refuses. ``hook``/``model_family`` override what
    the file records, as in :func:`formats.load_sae`.
    """
    path = Path(path)
    refuse_pickle(path)
    folder = layout_folder(path)
    if folder is not None:
        skeleton = import_folder(folder, load=False)
        weight = next(
            folder / name
            for name in ("sae.safetensors", "sae_weights.safetensors")
            if (folder / name).is_file()
        )  # import_folder checked there is one
        layout = _detect(weight, read_header(weight).entries)
    else:
        header, metadata = _read_native_header(path)
        k, provenance = _native_parts(path, header, metadata)
        skeleton = build_sae(path, meta_tensors(header), k, metadata.get("hook", "unknown"),
                             metadata.get("model_family", "unknown"), provenance)  # fmt: skip
        weight, layout = path, "native"
    if hook is not None:
        skeleton.hook = hook
    if model_family is not None:
        skeleton.model_family = model_family
    return SaeHandle(skeleton, weight, layout)


__all__ = ["SaeHandle", "open_sae"]
