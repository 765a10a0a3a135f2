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

Rows are read directly from every layout but one: native, sparsify and DiffLens kernel > 1 files hold them
contiguous; a DiffLens kernel-1 decoder is stored transposed, (C, L, 1, 1), so a row is a column, read stored
row by stored row (a chunk at a time) or, for the fingerprint, as blocks of columns; an SAELens decoder's rows
are multiplied by its per-latent ``scaling_factor`` as the importer does (float32 product, cast back), which
gives the same bits row by row. An SAELens file with ``rescale_acts_by_decoder_norm`` is loaded whole on the
first row request: the importer divides each row by its norm, a reduction whose rounding may depend on how
many rows are reduced at once, and a row read alone must equal the loaded SAE's bit for bit (its fingerprint
ties the feature sets to it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from os import PathLike
from pathlib import Path
from typing import BinaryIO, NamedTuple

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
_ROW_TENSOR = {"native": "W_dec", "sparsify": "W_dec", "difflens": "decoder.weight", "saelens": "W_dec"}
"""The tensor that holds the canonical decoder rows, per layout."""


class _RowSource(NamedTuple):
    """Where the canonical decoder rows lie in the weight file, and what makes a stored row one."""

    name: str
    """The decoder tensor's name in the file."""
    offset: int
    """Absolute file offset of its first byte."""
    dtype: torch.dtype
    """Its stored dtype (the canonical rows' dtype too)."""
    shape: tuple[int, ...]
    """The canonical decoder's shape, (L, ...) (what the fingerprint hashes with the rows)."""
    transposed: bool
    """Stored as (n_in, L) (DiffLens kernel 1): latent j's row is column j."""
    factor: Tensor | None
    """(L,) float32 per-latent factor multiplied into every row (SAELens ``scaling_factor``), or None."""


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
            if self._loaded is not None or self._row_source is None:
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
        source = None if self._loaded is not None else self._row_source
        if source is None:
            return self.load().w_dec_flat.detach()[ids].clone()
        with open(self.path, "rb") as file:
            rows = self._read_rows(file, source, ids.tolist())  # (U, n_in)
        return _canonical(source, rows, ids).to(self.dtype)

    # ------------------------------------------------------------------ file access
    @functools.cached_property
    def _row_source(self) -> _RowSource | None:
        """Where this file's decoder rows lie, or None when they are not read apart (see the module doc); read
        from the header once."""
        if self.path is None or self.layout not in _ROW_TENSOR:
            return None
        header = read_header(self.path)
        name = _ROW_TENSOR[self.layout]
        entry = header.entries[name]
        factor = None
        if self.layout == "saelens":
            config = self.path.parent / "cfg.json"  # checked by open_sae
            if json.loads(config.read_text(encoding="utf-8")).get("rescale_acts_by_decoder_norm", False):
                return None
            if "scaling_factor" in header.entries:
                factor = self._read_tensor(header, "scaling_factor").float()  # (L,)
        dtype = TORCH_DTYPES[entry["dtype"]]
        offset = header.data_start + entry["data_offsets"][0]
        transposed = self.layout == "difflens" and self.kernel_size == 1
        shape = (self.num_latents, self.n_in) if transposed else tuple(entry["shape"])
        return _RowSource(name, offset, dtype, shape, transposed, factor)

    def _read_tensor(self, header, name: str) -> Tensor:
        """A small tensor of the file, whole, checked to be finite."""
        entry = header.entries[name]
        out = torch.empty(entry["shape"], dtype=TORCH_DTYPES[entry["dtype"]])
        with open(self.path, "rb") as file:
            _read_into(file, header.data_start + entry["data_offsets"][0], out, self.path, name)
        if not _all_finite(out):
            raise FormatError(f"{self.path}: tensor {name!r} holds non-finite values (NaN or inf)")
        return out

    def _read_rows(self, file: BinaryIO, source: _RowSource, ids: list[int]) -> Tensor:
        """(U, n_in) stored rows of latents ``ids`` (any order, repeats allowed), before ``source.factor``."""
        n_in, latents = self.n_in, self.num_latents
        out = torch.empty(len(ids), n_in, dtype=source.dtype)
        row_bytes, where = n_in * out.element_size(), (self.path, source.name)
        if not source.transposed:
            for i, latent in enumerate(ids):
                _read_into(file, source.offset + latent * row_bytes, out[i], *where)
            return out
        index = torch.tensor(ids, dtype=torch.int64)
        stored_bytes = latents * out.element_size()  # one stored row: one channel of every latent
        per_chunk = max(1, _CHUNK_BYTES // stored_bytes)
        chunk = torch.empty(min(per_chunk, n_in), latents, dtype=source.dtype)  # stored rows, reused
        for first in range(0, n_in, per_chunk):
            part = chunk[: min(per_chunk, n_in - first)]
            _read_into(file, source.offset + first * stored_bytes, part, *where)
            out[:, first : first + part.shape[0]] = part[:, index].T
        return out

    def _read_block(self, file: BinaryIO, source: _RowSource, first: int, out: Tensor) -> Tensor:
        """Stored rows of latents first .. first + len(out) - 1 into ``out`` (count, n_in), before the factor."""
        item = out.element_size()
        if not source.transposed:
            _read_into(file, source.offset + first * self.n_in * item, out, self.path, source.name)
            return out
        columns = torch.empty(self.n_in, out.shape[0], dtype=source.dtype)  # (n_in, count)
        for row in range(self.n_in):  # stored row `row` holds channel `row` of every latent
            _read_into(file, source.offset + (row * self.num_latents + first) * item, columns[row], self.path,
                       source.name)  # fmt: skip
        out.copy_(columns.T)
        return out

    def _verify_decoder(self) -> str:
        """Stream the decoder once: its recorded digest (native files with digests), finiteness, fingerprint."""
        header, metadata, _ = read_header(self.path)
        recorded = _recorded_digests(self.path, header, metadata) if self.layout == "native" else None
        source = self._row_source
        raw = hashlib.sha256(str(tuple(header[source.name]["shape"])).encode())  # the stored bytes, in order
        # what SparseAutoencoder.fingerprint hashes: the canonical rows as float32 (for a native float32 file
        # the same bytes as raw)
        plain = source.dtype == torch.float32 and not source.transposed and source.factor is None
        wide = raw if plain else hashlib.sha256(str(source.shape).encode())
        latents = source.shape[0]
        rows_per_chunk = max(1, _CHUNK_BYTES // max(1, self.n_in * 4))
        buffer = torch.empty(min(rows_per_chunk, latents), self.n_in, dtype=source.dtype)  # reused: small
        with open(self.path, "rb") as file:
            for first in range(0, latents, rows_per_chunk):
                chunk = self._read_block(file, source, first, buffer[: min(rows_per_chunk, latents - first)])
                if recorded is not None or wide is raw:  # the stored order (a native file: never transposed)
                    raw.update(byte_view(chunk))
                if not _all_finite(chunk):
                    raise FormatError(
                        f"{self.path}: tensor {source.name!r} holds non-finite values (NaN or inf)"
                    )
                if wide is not raw:
                    ids = torch.arange(first, first + chunk.shape[0])
                    wide.update(_canonical(source, chunk, ids).to(torch.float32).numpy())
        stored = metadata.get("fingerprint") if self.layout == "native" else None
        if recorded is not None and recorded[source.name] != raw.hexdigest():
            raise FormatError(
                f"{self.path}: the data of tensor(s) [{source.name!r}] does not match the recorded digest: the "
                "file was damaged (a bad copy, download or disk); get a good copy again"
            )
        value = wide.hexdigest()[:16]
        if stored is not None and stored != value:
            raise FormatError(
                f"{self.path}: decoder fingerprint {value} does not match the recorded {stored}; "
                "the file was damaged or its weights were changed"
            )
        return value


def _canonical(source: _RowSource, rows: Tensor, ids: Tensor) -> Tensor:
    """Stored rows (U, n_in) of latents ``ids`` (U,) as the importer makes them (SAELens: times the factor)."""
    if source.factor is None:
        return rows
    return (rows.float() * source.factor[ids][:, None]).to(rows.dtype)  # the importer's float32 product


def _read_into(file: BinaryIO, offset: int, out: Tensor, path: Path, name: str) -> None:
    """Fill the contiguous CPU tensor ``out`` with the bytes at ``offset``; FormatError when the file ends."""
    view = memoryview(byte_view(out))
    file.seek(offset)
    if file.readinto(view) != len(view):
        raise FormatError(f"{path}: the file ended inside tensor {name!r}")


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
