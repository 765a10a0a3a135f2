"""Encoder-free edits: when z' - z does not depend on z, the edit is one constant vector per class.

With ``add`` and the other classes' features kept, every listed latent j of a row's class c gets
z'_j - z_j = strength at every position, whatever x is, so

    x' = x + strength * sum_{j listed by c} W_dec[j]        (one (n_in,) vector per class)

The encoder is never run and only the listed decoder rows are read. The result equals
:func:`intervention.apply_edit` (same float32 arithmetic, same clamp into a narrower dtype; the sum over the
listed rows may round differently), rows of class ``-1`` (or a class without features) stay bit for bit.
:data:`~intervention.SUPPRESS` rows ablate, which needs z: :func:`needs_encoder` says when to use
``apply_edit`` instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .intervention import SUPPRESS, EditSpec, FeatureTable


def needs_encoder(spec: EditSpec, image_class: Tensor | None = None) -> bool:
    """True unless the edit is ``add`` with others kept and no image is :data:`SUPPRESS`.

    image_class: (n,) int64 classes of the run's images (on the CPU: checking them syncs otherwise), or None
    when unknown (then only the spec decides).
    """
    if spec.mode != "add" or spec.others != "keep":
        return True
    return image_class is not None and bool((image_class == SUPPRESS).any())


def listed_latents(table: FeatureTable) -> Tensor:
    """(U,) int64 sorted distinct latent ids that ``table`` lists (padding left out): the decoder rows to read."""
    return torch.unique(table.ids[table.valid])


class ClassDeltas(NamedTuple):
    """The change of an encoder-free edit, per class."""

    delta: Tensor
    """(classes, n_in) float32 (float64 for a float64 decoder): strength times the sum of the class's rows."""
    edits: Tensor
    """(classes,) bool: the class lists at least one feature (its rows change)."""


def class_deltas(rows: Tensor, latents: Tensor, table: FeatureTable, spec: EditSpec) -> ClassDeltas:
    """The per-class change of an ``add`` edit with others kept.

    rows: (U, n_in) decoder rows of ``latents`` (U,) sorted ids (see :func:`listed_latents`), in the dtype the
    edit computes in (the SAE's). table: :class:`FeatureTable` on rows' device. Returns float32 (float64 for
    float64 rows) tensors on rows' device.
    """
    if spec.mode != "add" or spec.others != "keep":
        raise ValueError(f"class_deltas needs an 'add' edit with others 'keep', got {spec}")
    if rows.ndim != 2 or latents.shape != (rows.shape[0],):
        raise ValueError(
            f"rows must be (U, n_in) with latents (U,), got rows {tuple(rows.shape)} and latents "
            f"{tuple(latents.shape)}"
        )
    classes, top_k = table.ids.shape
    wide = torch.promote_types(rows.dtype, torch.float32)
    entries = table.ids.reshape(-1).to(rows.device)  # (M,)
    valid = table.valid.reshape(-1).to(rows.device)  # (M,)
    slot = torch.searchsorted(latents.to(rows.device), entries).clamp_(
        max=max(latents.numel() - 1, 0)
    )  # (M,)
    if latents.numel() == 0:
        weight = rows.new_zeros(entries.numel(), rows.shape[1], dtype=wide)  # no valid entry: nothing to add
    else:
        if bool(((latents.to(rows.device)[slot] != entries) & valid).any()):  # once per patch: a sync is fine
            raise ValueError(
                "class_deltas: latents do not hold every id the table lists (use listed_latents)"
            )
        weight = rows[slot].to(wide)  # (M, n_in), the rows apply_edit multiplies, in table order
    entry_class = torch.arange(classes, device=rows.device).repeat_interleave(top_k)  # (M,)
    own = valid[None, :] & (
        entry_class[None, :] == torch.arange(classes, device=rows.device)[:, None]
    )  # (cl, M)
    coefficient = torch.where(
        own,
        torch.full((), spec.strength, dtype=wide, device=rows.device),
        torch.zeros((), dtype=wide, device=rows.device),
    )  # (classes, M)
    delta = coefficient @ weight  # (classes, M) @ (M, n_in) -> (classes, n_in)
    return ClassDeltas(delta, own.any(1) & (spec.strength != 0.0))


def add_deltas(x: Tensor, deltas: ClassDeltas, sample_class: Tensor) -> Tensor:
    """Add each row's class delta to the SAE inputs ``x`` at every position.

    x: (B, P, n_in) (``sae.map_to_inputs`` output or (B, T, d_in) tokens), or a (B, C, H, W) map whose
    ``C*H*W`` (kernel > 1, one code per map) or ``C`` (per-token) equals n_in: see :func:`delta_shape`.
    sample_class: (B,) int64; ``-1`` and values outside [0, classes) leave the row bit for bit; it must not hold
    :data:`SUPPRESS` (see :func:`needs_encoder`). Returns x's shape, dtype and device. In float32 (float64
    deltas: float64) and, for a narrower x, clamped into x's finite range, exactly as ``apply_edit`` does.
    """
    if sample_class.shape != (x.shape[0],):
        raise ValueError(
            f"add_deltas expects sample_class of shape ({x.shape[0]},) for x of shape {tuple(x.shape)}, "
            f"got {tuple(sample_class.shape)}"
        )
    classes = deltas.delta.shape[0]
    row = sample_class.to(deltas.delta.device)  # (B,)
    index = row.clamp(0, max(classes - 1, 0))  # (B,)
    active = (row >= 0) & (row < classes) & deltas.edits[index]  # (B,)
    change = deltas.delta[index].to(x.device).reshape(x.shape[0], *delta_shape(x, deltas.delta.shape[1]))
    wide = deltas.delta.dtype
    if torch.finfo(x.dtype).bits >= torch.finfo(wide).bits:
        edited = x + change.to(x.dtype)
    else:  # add where it cannot overflow, then keep inside x's dtype
        limit = torch.finfo(x.dtype).max
        edited = (x.to(wide) + change).clamp_(-limit, limit).to(x.dtype)
    keep = active.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)
    return torch.where(keep, edited, x)


def delta_shape(x: Tensor, n_in: int) -> tuple[int, ...]:
    """How one row's (n_in,) delta broadcasts over one row of ``x`` (without its batch dim).

    (B, P, n_in) inputs or (B, T, C) tokens: (1, n_in); a (B, C, H, W) map: (C, 1, 1) for a per-token SAE
    (n_in == C), (C, H, W) for a kernel-K SAE that codes the whole map (n_in == C*H*W, H == W == K).
    """
    if x.ndim == 3 and x.shape[2] == n_in:
        return (1, n_in)
    if x.ndim == 4 and x.shape[1] == n_in:
        return (n_in, 1, 1)
    if x.ndim == 4 and x.shape[1] * x.shape[2] * x.shape[3] == n_in and x.shape[2] == x.shape[3]:
        return tuple(x.shape[1:])
    raise ValueError(
        f"an edit with SAE inputs of width {n_in} does not fit an activation of shape {tuple(x.shape)}: expected "
        "(B, P, n_in) inputs, (B, T, C) tokens or a (B, C, H, W) map with C or C*H*W equal to the width"
    )


__all__ = ["ClassDeltas", "add_deltas", "class_deltas", "delta_shape", "listed_latents", "needs_encoder"]
