"""Activations in shard files, read one sampling step at a time: bounded memory for attribution.

:class:`StepShards` is an :class:`~.activations.ActivationSource` over shard files that keeps only the
small columns (step, label, sample, timestep, cond: 29 bytes a row) in memory and copies the activations of
one step (or one chunk of rows) out of the files when they are asked for, opening each file for that read
only (a memory map left open keeps every page it has read resident). Rows come back in file order, so a
step's rows are in the order they were recorded, as :class:`~.activations.MemorySource` gives them, and
results computed from either source are the same.

:class:`ActivationSpool` is where a sampling run puts what it records: batches are buffered up to
``chunk_bytes`` and written as shards (the public format) into a private folder made inside the folder it
is given; :meth:`ActivationSpool.source` reads them back as :class:`StepShards`, and leaving its ``with``
block (normally, on an error or on a cancel) removes that folder and everything in it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .activations import ActivationBatch, ShardReader, concat_batches, make_batch, write_shard

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20
"""Default activation bytes an :class:`ActivationSpool` buffers before it writes them as one shard."""
SPOOL_PREFIX = "diffbias-activations-"
"""Name prefix of the private folder an :class:`ActivationSpool` makes."""


def _small_columns(reader: ShardReader) -> ActivationBatch:
    """All rows' small columns of one shard, as a batch whose activations are (N, 0) placeholders."""
    n = reader.info.rows

    def optional(name: str, default: Tensor) -> Tensor:
        try:
            return reader.column(name)
        except KeyError:  # timestep and cond are optional in the shard format
            return default

    return make_batch(torch.empty(n, 0), reader.column("step"), label=reader.column("label"),
                      sample=reader.column("sample"), timestep=optional("timestep", torch.full((n,), float("nan"))),
                      cond=optional("cond", torch.ones(n, dtype=torch.bool)))  # fmt: skip


class StepShards:
    """Shard files of one hook point as an ActivationSource that reads activations only when asked.

    paths: the shard files (ValueError naming both files when two disagree on hook, row shape or classes).
    dtype: the activations' dtype when read (None: as stored; float16 rows read as float32 are exactly the
    values a float16 model produced).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, dtype: torch.dtype | None = None) -> None:
        if not paths:
            raise ValueError("StepShards needs at least one shard file")
        self.paths = [Path(p) for p in paths]
        self.dtype = dtype
        parts, first = [], None
        for path in self.paths:
            reader = ShardReader(path)  # unmapped when it goes out of scope
            info = reader.info
            first = first or info
            for what, a, b in (("hook", first.hook, info.hook), ("row shape", first.row_shape, info.row_shape),
                               ("classes", first.classes, info.classes)):  # fmt: skip
                if a != b:
                    raise ValueError(
                        f"shards disagree on {what}: {first.path} has {a!r}, {info.path} has {b!r}"
                    )
            parts.append(_small_columns(reader))
            stored = reader.rows(slice(0, 0)).activations.dtype
        self.hook, self.classes, self.row_shape = first.hook, first.classes, first.row_shape
        self.read_dtype = dtype or stored
        self._columns = concat_batches(parts)  # (N, 0) activations: the small columns only
        self._file = torch.cat([torch.full((p.num_rows,), i, dtype=torch.int64) for i, p in enumerate(parts)])
        self._offset = torch.cat([torch.arange(p.num_rows) for p in parts])  # row index inside its file

    @property
    def num_rows(self) -> int:
        return self._columns.num_rows

    @property
    def row_bytes(self) -> int:
        """Bytes of one activation as read (its dtype's size times the row shape's product)."""
        return math.prod(self.row_shape) * torch.empty(0, dtype=self.read_dtype).element_size()

    def steps(self) -> list[int]:
        return sorted(set(self._columns.step.tolist()))

    def column(self, name: str) -> Tensor:
        return getattr(self._columns, name)

    def select_step(self, step: int) -> ActivationBatch:
        rows = torch.nonzero(self._columns.step == step).flatten()
        if not rows.numel():
            raise ValueError(f"no activations of step {step} in {[str(p) for p in self.paths]}")
        return self._read(rows)

    def iter_batches(self, rows: int, *, start: int = 0, every: int = 1) -> Iterator[ActivationBatch]:
        """Chunks of ``rows`` consecutive rows over all files (the last one may be shorter)."""
        for first in range(start * rows, self.num_rows, every * rows):
            yield self._read(torch.arange(first, min(first + rows, self.num_rows)))

    def _read(self, rows: Tensor) -> ActivationBatch:
        """The rows ``rows`` (sorted (M,) int64 global indices): one allocation for the activations (M, ...)."""
        out = torch.empty(len(rows), *self.row_shape, dtype=self.read_dtype)  # (M, *row_shape)
        files = self._file[rows]
        done = 0
        for file in files.unique().tolist():  # sorted rows: each file's rows are one run of ``out``
            mine = rows[files == file]
            reader = ShardReader(self.paths[file])
            out[done : done + len(mine)].copy_(reader.rows(self._offset[mine].numpy()).activations)  # casts
            done += len(mine)
            del reader  # unmapped: the pages read do not stay resident
        columns = self._columns.select(rows)
        return ActivationBatch(out, *columns[1:])


class ActivationSpool:
    """Recorded batches written as shards into a private folder inside ``folder``, removed on exit.

    ``with ActivationSpool(folder, hook=..., classes=...) as spool: spool.add(batch); source = spool.source()``.
    chunk_bytes: activation bytes buffered before a shard is written (>= 1). The folder and its files are
    removed when the ``with`` block ends, whatever ends it, and by :meth:`close`.
    """

    def __init__(self, folder: str | os.PathLike, *, hook: str, classes: Sequence[str] = (),
                 chunk_bytes: int = CHUNK_BYTES) -> None:  # fmt: skip
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
        self.hook, self.classes, self.chunk_bytes = hook, tuple(classes), chunk_bytes
        self.folder = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX, dir=folder))
        self.files: list[Path] = []
        self.bytes_written = 0
        self._pending: list[ActivationBatch] = []
        self._pending_bytes = 0

    def __enter__(self) -> ActivationSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, batch: ActivationBatch) -> None:
        """Keep ``batch`` (copied to the CPU); what is buffered is written as a shard before it would pass
        ``chunk_bytes`` (a batch larger than that is a shard of its own), so the buffer and the copy joining it
        stay within ``2 * chunk_bytes``."""
        batch = ActivationBatch(*(field.detach().cpu() for field in batch))
        size = batch.activations.numel() * batch.activations.element_size()
        if self._pending and self._pending_bytes + size > self.chunk_bytes:
            self.flush()
        self._pending.append(batch)
        self._pending_bytes += size
        if self._pending_bytes >= self.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered as one shard."""
        if not self._pending:
            return
        path = self.folder / f"part-{len(self.files):06d}.safetensors"
        batch = concat_batches(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_bytes = [], 0
        write_shard(path, batch, hook=self.hook, classes=self.classes)
        self.files.append(path)
        self.bytes_written += path.stat().st_size

    def source(self, dtype: torch.dtype | None = None) -> StepShards:
        """Everything added so far (flushed first), read back one step at a time."""
        self.flush()
        if not self.files:
            raise ValueError("no activations were recorded")
        return StepShards(self.files, dtype=dtype)

    def close(self) -> None:
        """Remove the folder and its shards (again: nothing happens)."""
        self._pending = []
        if self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
            logger.debug("removed %s (%d shards)", self.folder, len(self.files))


def spool_folders(folder: str | os.PathLike) -> list[Path]:
    """The spool folders inside ``folder`` (a check that none was left behind)."""
    return sorted(Path(folder).glob(f"{SPOOL_PREFIX}*"))


__all__ = ["CHUNK_BYTES", "SPOOL_PREFIX", "ActivationSpool", "StepShards", "spool_folders"]
