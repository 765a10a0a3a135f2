"""What an attribution run will need, said before it starts: RAM at its peak and the temporary disk.

The run streams (:mod:`~..dissect.spool`): while sampling it buffers one chunk of activations and writes it
to disk; the probes and the integrated gradients then hold one sampling step's activations at a time. Its
RAM peak is the largest of three phases, each holding one step's activations, never all of them:

* sampling: the chunk buffered and its joined copy, ``2 * chunk_bytes``;
* probes (those ``ig`` needs, or fitted for their accuracy): the step (float32), its training rows and
  their standardised copy (3 steps' worth), and L-BFGS's history of ``min(iterations, 100)`` pairs of
  parameter-sized vectors (``classes * features`` each), which at SDXL's bottleneck outweighs the step;
* ranking: the step and its selection, plus one batched IG pass: ``points * rows * features`` interpolated
  values (about 10 tensors of that size with autograd) and the dense ``(rows * positions, num_latents)``
  pre-activations, differences and gradients; ``mean-diff`` reads chunks of ``_ELEMENTS`` values instead.

What does grow with the steps is small: the fitted probes (``classes * features`` values a step, from the
probe phase on) and 29 bytes of columns per activation. The temporary disk holds every activation once, in the dtype it was recorded in. The figures are upper
bounds of what the core allocates (tests/core/test_reliability_stream.py measures them); the diffusion model
and the SAE themselves are not included.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from ..base.memory import check_disk_fits, check_fits, format_bytes
from ..dissect.spool import CHUNK_BYTES
from ..sae.model import SparseAutoencoder
from .attribution import _ELEMENTS, AttributionConfig
from .probes import ProbeConfig

_LBFGS_HISTORY = 100  # torch.optim.LBFGS's default history_size, which fit_logistic keeps
_COLUMN_BYTES = 8 + 4 + 8 + 8 + 1  # step, timestep, label, sample, cond of one row, kept in memory
_HEADER_BYTES = 4096  # a spooled shard's header (tensor entries, metadata, digests: about 1.2 KB)


class AttributionMemory(NamedTuple):
    """Bytes an attribution run needs. ram: the peak of the three phases; disk: the temporary shards;
    step: one step's activations as float32; phases: the peak of each phase by name."""

    ram: int
    disk: int
    step: int
    phases: dict[str, int]

    def describe(self) -> str:
        """``RAM 1.2 GiB (probes), temporary disk 20.0 GiB``."""
        worst = max(self.phases, key=self.phases.get)
        return f"RAM {format_bytes(self.ram)} at most ({worst}), temporary disk {format_bytes(self.disk)}"


def attribution_memory(sae: SparseAutoencoder, row_shape: tuple[int, ...], *, images: int, steps: int,
                       classes: int, attribution: AttributionConfig, probes: ProbeConfig | None,
                       recorded_itemsize: int = 4, chunk_bytes: int = CHUNK_BYTES) -> AttributionMemory:  # fmt: skip
    """The memory of ranking ``sae``'s latents from ``images`` activations of ``row_shape`` ((d_in,) or
    (C, H, W)) at each of ``steps`` steps, of ``classes`` classes.

    probes: how the per-step probes are fitted, None when none are (``ig`` needs them).
    recorded_itemsize: bytes per value as spooled (2 for a float16 model). chunk_bytes: the spool's buffer.
    """
    positions = 1 if sae.kernel_size > 1 or len(row_shape) == 1 else math.prod(row_shape[1:])  # codes per row
    num_latents = sae.num_latents
    features = math.prod(row_shape)
    step = images * features * 4
    data = images * steps * (features * recorded_itemsize + _COLUMN_BYTES)
    disk = data + _HEADER_BYTES * max(1, math.ceil(data / chunk_bytes))  # every shard: its header and digests
    phases = {"sampling": 2 * min(chunk_bytes, max(data, 1))}
    weights = 0  # the fitted probes, kept from the probe phase on: one (classes, features) matrix a step
    if probes is not None:
        weights = steps * (classes * features + classes) * 4
        history = min(probes.iterations, _LBFGS_HISTORY)
        phases["probes"] = weights + 3 * step + (2 * history + 8) * (classes * features + classes) * 4
    if attribution.method == "ig":
        partners = classes - 1 if attribution.baseline == "paired" else 0
        per_row = attribution.points * features * max(1, partners)
        rows = min(images, max(1, _ELEMENTS // max(1, per_row)))  # the rows of one batched pass
        read = rows * features * (1 + partners)  # the pass's activations and their partners
        interpolated = attribution.points * rows * features  # (points, rows, positions, n_in)
        dense = rows * positions * num_latents * (4 + 2 * partners)  # (rows * positions, num_latents)
        phases["ranking"] = weights + 2 * step + (2 * read + 10 * interpolated + dense) * 4
    elif attribution.method == "mean-diff":
        rows = min(images * steps, max(1, _ELEMENTS // max(1, features)))
        phases["ranking"] = weights + 2 * rows * features * 4 + 3 * rows * positions * num_latents * 8
    columns = images * steps * _COLUMN_BYTES * 2  # the columns and one step's selection of them
    ram = max(phases.values()) + columns
    return AttributionMemory(ram, disk, step, phases)


def check_attribution_fits(need: AttributionMemory, folder: str | os.PathLike, what: str) -> None:
    """MemoryError when the RAM is not available, OSError when ``folder``'s disk has no room for the shards."""
    check_fits(need.ram, what)
    check_disk_fits(need.disk, folder, f"{what} (its activations on disk)")


__all__ = ["AttributionMemory", "attribution_memory", "check_attribution_fits"]
