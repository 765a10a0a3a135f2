"""Activation batches and the public shard format.

Everything that trains an SAE or attributes features consumes :class:`ActivationBatch` rows, from any
producer: the ComfyUI capture node, a plain torch forward hook (:mod:`.hooks`) or saved shards.

Shard format (public; users share these files): one ``.safetensors`` file with tensors

* ``activations``: (N, d_in) vectors or (N, C, H, W) maps, float32 / float16 / bfloat16;
* ``step``: (N,) int, sampling step index (0 = first step of the run);
* ``label``: (N,) int, class index into ``classes`` (-1 = unlabelled);
* ``sample``: (N,) int, the id of the initial noise: rows with the same sample id and step but another
  label were generated from the same noise under another class prompt (the pairing that the paired
  integrated-gradients baseline uses);
* optional ``timestep``: (N,) float, the model's own timestep (sigma-derived), and ``cond``: (N,) bool,
  True for the conditional half of a classifier-free-guidance batch;

and string metadata ``hook`` (hook point, see docs/ARCHITECTURE.md) and ``classes`` (comma-separated class names in
label order, empty when unlabelled). Readers memory-map the file, so a set of shards far larger than RAM
can be streamed in bounded memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from ..base.layout import activations_to_rows
from ..base.safefile import write_safetensors
from ..base.tensorfile import DTYPES, read_header

SHARD_FORMAT = "diffbias.activations"
SHARD_VERSION = "1"
REQUIRED = ("activations", "step", "label", "sample")


class ActivationBatch(NamedTuple):
    """N hooked activations with their sampling context (all tensors share the leading dim N).

    activations: (N, d_in) or (N, C, H, W), any float dtype, the hook output of one image at one step.
    step: (N,) int64 sampling step index, 0 = first step of the run.
    timestep: (N,) float32 model timestep (the diffusion model's own time input); NaN when unknown.
    label: (N,) int64 class index into the class names, -1 for unlabelled rows.
    sample: (N,) int64 initial-noise id; same id = same noise under different class prompts (pairing).
    cond: (N,) bool, True for the conditional half of a CFG batch (True when there is no CFG).
    """

    activations: Tensor
    step: Tensor
    timestep: Tensor
    label: Tensor
    sample: Tensor
    cond: Tensor

    @property
    def num_rows(self) -> int:
        """N, the number of activations."""
        return int(self.activations.shape[0])

    def select(self, index: Tensor | slice) -> ActivationBatch:
        """The rows ``index`` (bool mask, int64 ids or a slice) of every field."""
        return ActivationBatch(*(field[index] for field in self))


def make_batch(
    activations: Tensor,
    step: Tensor | int,
    *,
    label: Tensor | int = -1,
    sample: Tensor | int | None = None,
    timestep: Tensor | float | None = None,
    cond: Tensor | bool = True,
) -> ActivationBatch:
    """Build a validated :class:`ActivationBatch`, broadcasting scalars to (N,).

    activations: (N, d_in) or (N, C, H, W). ``sample`` defaults to 0..N-1 (no pairing).
    """
    if activations.ndim not in (2, 4):
        raise ValueError(
            f"activations must be (N, d_in) or (N, C, H, W), got shape {tuple(activations.shape)}"
        )
    n = activations.shape[0]

    def column(value, dtype: torch.dtype, name: str) -> Tensor:
        out = torch.as_tensor(value).to(dtype=dtype).reshape(-1)
        if out.numel() == 1 and n != 1:
            out = out.expand(n).clone()
        if out.shape != (n,):
            raise ValueError(f"{name} must have one entry per activation ({n}), got shape {tuple(out.shape)}")
        return out

    sample = torch.arange(n) if sample is None else sample
    timestep = float("nan") if timestep is None else timestep
    return ActivationBatch(
        activations,
        column(step, torch.int64, "step"),
        column(timestep, torch.float32, "timestep"),
        column(label, torch.int64, "label"),
        column(sample, torch.int64, "sample"),
        column(cond, torch.bool, "cond"),
    )


def concat_batches(batches: Sequence[ActivationBatch]) -> ActivationBatch:
    """Concatenate batches along N (activations must share their row shape)."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    return ActivationBatch(*(torch.cat(fields) for fields in zip(*batches, strict=True)))


def to_sae_inputs(activations: Tensor, kernel_size: int = 1) -> Tensor:
    """Rows an SAE reads from hooked activations (:func:`~..base.layout.activations_to_rows`).

    activations: (N, d) -> (N, d); (N, T, C) tokens -> (N*T, C); (N, C, H, W) -> (N*H*W, C) for kernel 1,
    or (N, C*H*W) for a K x K kernel (then H == W == K, the whole map is one code).
    """
    return activations_to_rows(activations, kernel_size)


# ---------------------------------------------------------------------------------------------- writing
def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    classes = tuple(classes)
    for name in classes:
        if not name or "," in name or name != name.strip():
            raise ValueError(f"class names must be non-empty, without commas or outer spaces, got {name!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {classes}")
    return classes


def write_shard(
    path: str | os.PathLike,
    batch: ActivationBatch,
    *,
    hook: str,
    classes: Sequence[str] = (),
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``batch`` as one shard (atomically). ``classes`` names labels 0..len-1 in order.

    Raises ValueError when a label is outside [-1, len(classes)) or the fields disagree in length.
    """
    classes = _check_classes(classes)
    if not hook:
        raise ValueError("write_shard: hook must be a non-empty hook-point name")
    checked = make_batch(
        batch.activations,
        batch.step,
        label=batch.label,
        sample=batch.sample,
        timestep=batch.timestep,
        cond=batch.cond,
    )
    if checked.num_rows and (checked.label.min() < -1 or checked.label.max() >= len(classes)):
        raise ValueError(
            f"write_shard {path}: labels must be in [-1, {len(classes)}) for classes {classes}, found "
            f"[{int(checked.label.min())}, {int(checked.label.max())}]"
        )
    meta = {
        "format": SHARD_FORMAT,
        "format_version": SHARD_VERSION,
        "hook": hook,
        "classes": ",".join(classes),
    }
    meta.update(metadata or {})
    write_safetensors({k: v.detach().cpu().contiguous() for k, v in checked._asdict().items()}, meta, path)


# ---------------------------------------------------------------------------------------------- reading
class ShardInfo(NamedTuple):
    """What a shard holds, read from its header only.

    path: the file. hook: its hook point. classes: class names in label order.
    rows: N. row_shape: shape of one activation, (d_in,) or (C, H, W). metadata: all metadata strings.
    """

    path: Path
    hook: str
    classes: tuple[str, ...]
    rows: int
    row_shape: tuple[int, ...]
    metadata: dict[str, str]


class ShardReader:
    """Memory-mapped read access to one shard; rows are copied out only when selected."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            header, metadata, data_start = read_header(self.path)  # framing, dtypes, shapes, offsets checked
        except ValueError as err:  # FormatError
            raise ValueError(f"{self.path}: not a readable .safetensors activation shard ({err})") from None
        missing = [name for name in REQUIRED if name not in header]
        if missing or "hook" not in metadata:
            raise ValueError(
                f"{self.path}: not an activation shard: missing tensors {missing} or metadata 'hook' "
                f"(found tensors {sorted(header)}, metadata keys {sorted(metadata)})"
            )
        self._maps: dict[str, np.ndarray] = {}
        self._torch_dtype: dict[str, torch.dtype] = {}
        for name, entry in header.items():
            dtype = DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if end == start:
                self._maps[name] = np.zeros(shape, dtype=dtype.numpy)
            else:
                self._maps[name] = np.memmap(
                    self.path, dtype=dtype.numpy, mode="r", offset=data_start + start, shape=shape
                )
            self._torch_dtype[name] = dtype.torch
        acts = self._maps["activations"]
        if acts.ndim not in (2, 4):
            raise ValueError(
                f"{self.path}: 'activations' must be (N, d_in) or (N, C, H, W), got {acts.shape}"
            )
        n = acts.shape[0]
        for name in ("step", "label", "sample", "timestep", "cond"):
            if name in self._maps and self._maps[name].shape != (n,):
                raise ValueError(
                    f"{self.path}: tensor {name!r} has shape {self._maps[name].shape}, expected ({n},) "
                    f"like the {n} activations"
                )
        classes = tuple(metadata.get("classes", "").split(",")) if metadata.get("classes") else ()
        self.info = ShardInfo(self.path, metadata["hook"], classes, n, tuple(acts.shape[1:]), metadata)

    def _column(self, name: str, index) -> Tensor:
        out = torch.from_numpy(np.array(self._maps[name][index]))  # a copy: the map stays read-only
        return out.view(self._torch_dtype[name])  # bfloat16 and float8 are read as same-width integers

    def rows(self, index: np.ndarray | slice) -> ActivationBatch:
        """Copy the rows ``index`` (an int array or a slice) out of the file."""
        acts = self._column("activations", index)
        n = acts.shape[0]
        timestep = (
            self._column("timestep", index) if "timestep" in self._maps else torch.full((n,), float("nan"))
        )
        cond = self._column("cond", index) if "cond" in self._maps else torch.ones(n, dtype=torch.bool)
        return make_batch(
            acts,
            self._column("step", index),
            label=self._column("label", index),
            sample=self._column("sample", index),
            timestep=timestep,
            cond=cond,
        )

    def column(self, name: str) -> Tensor:
        """A whole small column (``step``, ``label``, ``sample``...) as a tensor."""
        return self._column(name, slice(None))


def read_shard(path: str | os.PathLike) -> tuple[ActivationBatch, ShardInfo]:
    """Load a whole shard into memory: (batch, info)."""
    reader = ShardReader(path)
    return reader.rows(slice(None)), reader.info


class ActivationSource(Protocol):
    """Anything the trainer and the attribution read activations from."""

    hook: str
    classes: tuple[str, ...]
    row_shape: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        """Number of activations N."""
        ...

    def iter_batches(self, rows: int, *, start: int = 0, every: int = 1) -> Iterator[ActivationBatch]:
        """The activations in order, in chunks of ``rows`` (a file's last chunk may be shorter).

        Chunks are numbered from 0; yields chunks start, start + every, start + 2 * every, ... (``every``
        > 1 splits the stream between processes).
        """
        ...

    def steps(self) -> list[int]:
        """Sorted distinct step indices."""
        ...

    def select_step(self, step: int) -> ActivationBatch:
        """All activations of one sampling step."""
        ...

    def column(self, name: str) -> Tensor:
        """A whole small column (``step``, ``label``, ``sample``, ...) over all activations: (N,)."""
        ...


class ShardSet:
    """Several shards of one hook point, streamed in bounded memory.

    Raises ValueError naming both files when shards disagree on hook, row shape or class names.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        if not paths:
            raise ValueError("ShardSet needs at least one shard file")
        self.readers = [ShardReader(p) for p in paths]
        first = self.readers[0].info
        for reader in self.readers[1:]:
            info = reader.info
            for what, a, b in (
                ("hook", first.hook, info.hook),
                ("row shape", first.row_shape, info.row_shape),
                ("classes", first.classes, info.classes),
            ):
                if a != b:
                    raise ValueError(
                        f"shards disagree on {what}: {first.path} has {a!r}, {info.path} has {b!r}"
                    )
        self.hook = first.hook
        self.classes = first.classes
        self.row_shape = first.row_shape
        self._steps = [r.column("step") for r in self.readers]

    @property
    def num_rows(self) -> int:
        return sum(r.info.rows for r in self.readers)

    def iter_batches(self, rows: int, *, start: int = 0, every: int = 1) -> Iterator[ActivationBatch]:
        chunk = 0
        for reader in self.readers:
            for first in range(0, reader.info.rows, rows):
                if chunk >= start and (chunk - start) % every == 0:
                    yield reader.rows(slice(first, first + rows))
                chunk += 1

    def steps(self) -> list[int]:
        return sorted(set(torch.cat(self._steps).tolist()))

    def column(self, name: str) -> Tensor:
        return torch.cat([reader.column(name) for reader in self.readers])

    def select_step(self, step: int) -> ActivationBatch:
        parts = [
            reader.rows(torch.nonzero(steps == step).flatten().numpy())
            for reader, steps in zip(self.readers, self._steps, strict=True)
            if bool((steps == step).any())
        ]
        if not parts:
            raise ValueError(f"no activations of step {step} in {[str(r.path) for r in self.readers]}")
        return concat_batches(parts)


class MemorySource:
    """An in-memory :class:`ActivationBatch` as an :class:`ActivationSource`."""

    def __init__(self, batch: ActivationBatch, *, hook: str, classes: Sequence[str] = ()) -> None:
        self.batch = batch
        self.hook = hook
        self.classes = _check_classes(classes)
        self.row_shape = tuple(batch.activations.shape[1:])

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows

    def iter_batches(self, rows: int, *, start: int = 0, every: int = 1) -> Iterator[ActivationBatch]:
        for first in range(start * rows, self.batch.num_rows, every * rows):
            yield self.batch.select(slice(first, first + rows))

    def steps(self) -> list[int]:
        return sorted(set(self.batch.step.tolist()))

    def select_step(self, step: int) -> ActivationBatch:
        return self.batch.select(self.batch.step == step)

    def column(self, name: str) -> Tensor:
        return getattr(self.batch, name)


__all__ = [
    "ActivationBatch",
    "ActivationSource",
    "MemorySource",
    "ShardInfo",
    "ShardReader",
    "ShardSet",
    "concat_batches",
    "make_batch",
    "read_shard",
    "to_sae_inputs",
    "write_shard",
]
