"""Feature intervention: change the selected SAE latents of one class per image, add back only the change.

For the SAE inputs ``x`` of one hook call (the hook activation, see ``SparseAutoencoder.map_to_inputs``):

    z = TopK(ReLU(W_enc (x - b_dec) + b_enc))      z' = edit(z)      x' = x + W_dec (z' - z)

The reconstruction error of the SAE is never added, so a neutral edit is the exact identity. Only the
latents listed in a :class:`FeatureTable` are looked at: ``z_j`` is read from the top-k code (it is 0 when
latent j is not among the k active ones) and the change is decoded from the selected decoder rows only.

Every image (batch row) has a class: the class whose features are edited for it, ``-1`` to leave the
row unchanged, or :data:`SUPPRESS` to ablate the features of every class. :func:`assign_classes` draws
classes for a batch so that it follows a target distribution (how a sampler's batch stacks the images is
the nodes' business). ``add`` with the other classes kept needs no encoder: see ``additive.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..attribute.features import FeatureSet
    from ..sae.model import SparseAutoencoder

EditMode = Literal["scale", "add", "set", "ablate"]
OthersMode = Literal["keep", "ablate"]
EDIT_MODES: tuple[str, ...] = ("scale", "add", "set", "ablate")
OTHERS_MODES: tuple[str, ...] = ("keep", "ablate")

KEEP = -1
"""Row class meaning: leave this row unchanged (bit for bit)."""
SUPPRESS = -2
"""Row class meaning: ablate (set to 0) the listed features of every class."""


@dataclass(frozen=True)
class EditSpec:
    """How the selected latents of a row's class are changed."""

    mode: EditMode = "add"
    """``scale``: z_j *= strength; ``add``: z_j += strength at every position; ``set``: z_j = strength;
    ``ablate``: z_j = 0 (strength unused)."""
    strength: float = 0.0
    """Factor (scale, neutral 1.0), amount (add, neutral 0.0) or value (set). Finite."""
    top_k: int = 10
    """Features per class taken from the FeatureSet, >= 0 (0 edits nothing)."""
    others: OthersMode = "keep"
    """The listed features of the classes a row is NOT assigned: ``keep`` them or ``ablate`` (set to 0)."""

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise ValueError(f"EditSpec.mode must be one of {EDIT_MODES}, got {self.mode!r}")
        if self.others not in OTHERS_MODES:
            raise ValueError(f"EditSpec.others must be one of {OTHERS_MODES}, got {self.others!r}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise ValueError(f"EditSpec.strength must be a number, got {self.strength!r}")
        if not math.isfinite(self.strength):
            raise ValueError(f"EditSpec.strength must be finite, got {self.strength!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"EditSpec.top_k must be an integer >= 0, got {self.top_k!r}")

    @property
    def is_identity(self) -> bool:
        """True when the edit cannot change anything: no features, or scale 1 / add 0 with others kept.

        An identity spec turns the whole edit off, :data:`SUPPRESS` rows included.
        """
        if self.top_k == 0:
            return True
        neutral = (self.mode == "scale" and self.strength == 1.0) or (
            self.mode == "add" and self.strength == 0.0
        )
        return neutral and self.others == "keep"


class FeatureTable(NamedTuple):
    """The top features of every class as padded tensors, ready for :func:`apply_edit`."""

    ids: Tensor
    """(classes, top_k) int64 latent ids, best first; padding entries hold 0."""
    valid: Tensor
    """(classes, top_k) bool, False on padding (a class with fewer than top_k features)."""


def feature_table(features: FeatureSet, top_k: int, device: torch.device | str | None = None) -> FeatureTable:
    """Pad the ``top_k`` best ids of each class of ``features`` into a :class:`FeatureTable` on ``device``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    ids = torch.zeros(features.num_classes, top_k, dtype=torch.int64)
    valid = torch.zeros(features.num_classes, top_k, dtype=torch.bool)
    for c in range(features.num_classes):
        best = features.top(c, top_k)
        ids[c, : best.numel()] = best
        valid[c, : best.numel()] = True
    return FeatureTable(ids.to(device), valid.to(device))


def _edit_coefficients(
    table: FeatureTable, sample_class: Tensor, spec: EditSpec, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Per row and table entry, (a, c) with z'_j - z_j = a * z_j + c.

    sample_class: (B,) -> a, c: (B, M), M = classes * top_k, entries in the order of ``table.ids.flatten()``.
    A latent listed by the row's own class gets the spec's edit; one listed only by other classes is
    ablated once (others="ablate" or a SUPPRESS row); everything else is left.
    """
    classes, top_k = table.ids.shape
    ids = table.ids.reshape(-1)  # (M,)
    valid = table.valid.reshape(-1)  # (M,)
    device = ids.device
    entry_class = torch.arange(classes, device=device).repeat_interleave(top_k)  # (M,)
    same = (ids[:, None] == ids[None, :]) & valid[:, None] & valid[None, :]  # (M, M) same latent
    earlier = torch.ones(ids.numel(), ids.numel(), dtype=torch.bool, device=device).tril(-1)  # (M, M) m' < m
    first = valid & ~(same & earlier).any(1)  # (M,) first listing of its latent
    listed_by = same.reshape(classes, top_k, -1).any(1)  # (classes, M): class c lists entry m's latent

    row = sample_class.to(device)  # (B,)
    active = (row >= 0) & (row < classes)  # (B,)
    own = active[:, None] & valid[None, :] & (entry_class[None, :] == row[:, None])  # (B, M)
    own_lists = listed_by[row.clamp(0, classes - 1)] & active[:, None]  # (B, M): own class lists the latent
    ablate = first[None, :] & (row == SUPPRESS)[:, None]  # (B, M)
    if spec.others == "ablate":
        ablate = ablate | (first[None, :] & active[:, None] & ~own_lists)

    own_a, own_c = {
        "scale": (spec.strength - 1.0, 0.0),
        "add": (0.0, spec.strength),
        "set": (-1.0, spec.strength),
        "ablate": (-1.0, 0.0),
    }[spec.mode]
    zero = torch.zeros((), dtype=dtype, device=device)
    a = torch.where(own, torch.full((), own_a, dtype=dtype, device=device), zero)
    a = torch.where(ablate, torch.full((), -1.0, dtype=dtype, device=device), a)
    c = torch.where(own, torch.full((), own_c, dtype=dtype, device=device), zero)
    return a, c


def _selected_values(values: Tensor, indices: Tensor, ids: Tensor, num_latents: int) -> Tensor:
    """z_j of latents ``ids`` (M,) from a top-k code (values, indices: (B, P, k)) -> (B, P, M); 0 where not active.

    A (num_latents,) map sends each listed latent to one slot (M = "not listed"); the code's values are
    scattered into (B, P, M + 1) slots. Indices are distinct per token, so a listed slot receives at most one
    value and is exact; the spare slot collects the rest and is dropped. Memory O(B P (k + M)).
    """
    entries = ids.numel()
    slot_of = torch.full((num_latents,), entries, dtype=torch.int64, device=ids.device)  # (L,)
    slot_of[ids] = torch.arange(entries, device=ids.device)  # a repeated latent keeps one of its slots
    slots = values.new_zeros(*values.shape[:-1], entries + 1)  # (B, P, M + 1)
    slots.scatter_(-1, slot_of[indices], values)  # the spare slot M may be written many times
    return slots[..., slot_of[ids]]  # (B, P, M): each entry reads its latent's slot


def apply_edit(
    x: Tensor, sae: SparseAutoencoder, table: FeatureTable, sample_class: Tensor, spec: EditSpec
) -> Tensor:
    """Edit the selected latents of each row's class and add the decoded change to ``x``.

    x: (B, P, n_in) SAE inputs (``sae.map_to_inputs`` output, or (B, T, d_in) tokens).
    table: :class:`FeatureTable` on the SAE's device.
    sample_class: (B,) int64, the class per row; ``-1`` leaves the row unchanged (bit for bit),
        :data:`SUPPRESS` ablates every class's features; other values outside [0, classes) act as -1.
    Returns (B, P, n_in) in x's dtype and device: ``x + W_dec (z' - z)``; ``x`` itself for an identity spec.
    The edit is computed in float32 (z times a strength of 1000 overflows float16) and, for a narrower x,
    clamped to x's finite range before the cast back: the result is never inf or NaN where x was finite.
    No host-device synchronisation, no dense (B, P, num_latents) tensor beyond the encoder's own.
    """
    if spec.is_identity:
        return x
    if x.ndim != 3 or sample_class.shape != (x.shape[0],):
        raise ValueError(
            f"apply_edit expects x of shape (B, P, n_in) and sample_class of shape (B,), "
            f"got x {tuple(x.shape)} and sample_class {tuple(sample_class.shape)}"
        )
    if table.ids.shape != table.valid.shape or table.ids.ndim != 2:
        raise ValueError(
            f"FeatureTable ids and valid must be (classes, top_k), got {tuple(table.ids.shape)} "
            f"and {tuple(table.valid.shape)}"
        )
    weight = sae.w_dec_flat
    code = sae.encode(x.to(weight.device))  # values, indices: (B, P, k)
    wide = torch.promote_types(weight.dtype, torch.float32)  # float32 unless the SAE is float64
    a, c = _edit_coefficients(table, sample_class, spec, wide)  # (B, M) each
    ids = table.ids.reshape(-1)  # (M,)
    z = _selected_values(code.values.to(wide), code.indices, ids, sae.num_latents)  # (B, P, M)
    delta = a.unsqueeze(1) * z + c.unsqueeze(1)  # (B, P, M) = z' - z
    change = delta @ weight[ids].to(wide)  # (B, P, M) @ (M, n_in) -> (B, P, n_in), only M rows widened
    if torch.finfo(x.dtype).bits >= torch.finfo(wide).bits:
        edited = x + change.to(device=x.device, dtype=x.dtype)
    else:  # add where it cannot overflow, then keep inside x's dtype
        limit = torch.finfo(x.dtype).max
        edited = (x.to(wide) + change.to(x.device)).clamp_(-limit, limit).to(x.dtype)
    keep = ((a != 0) | (c != 0)).any(1).to(x.device)  # (B,) rows with any change
    return torch.where(keep[:, None, None], edited, x)


def edit_map(
    h: Tensor, sae: SparseAutoencoder, table: FeatureTable, sample_class: Tensor, spec: EditSpec
) -> Tensor:
    """:func:`apply_edit` on a spatial map. h: (B, C, H, W) -> (B, C, H, W); ``h`` itself for an identity spec."""
    if spec.is_identity:
        return h
    x = sae.map_to_inputs(h)  # (B, P, n_in)
    return sae.inputs_to_map(apply_edit(x, sae, table, sample_class, spec), h.shape[2], h.shape[3])


def assign_classes(num_images: int, weights: Sequence[float], seed: int) -> Tensor:
    """A class per image so that the batch follows ``weights``, stratified and reproducible.

    Counts are ``weights / sum(weights) * num_images`` rounded by largest remainder (ties to the lower
    class index), exact in rational arithmetic; the labels are then shuffled by a ``torch.Generator``
    seeded with ``seed``. Returns (num_images,) int64 in [0, len(weights)).
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be an integer >= 0, got {num_images!r}")
    exact = [_check_weight(w, i) for i, w in enumerate(weights)]
    if not exact or sum(exact) == 0:
        raise ValueError(
            f"weights must be at least one non-negative number with a positive sum, got {list(weights)}"
        )
    quotas = [w * num_images / sum(exact) for w in exact]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: num_images - sum(counts)]:
        counts[i] += 1
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))
    generator = torch.Generator().manual_seed(int(seed))
    return labels[torch.randperm(num_images, generator=generator)]


def _check_weight(weight: float, index: int) -> Fraction:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ValueError(f"weight {index} must be a finite number >= 0, got {weight!r}")
    return Fraction(weight)


def parse_target(text: str, classes: Sequence[str]) -> tuple[float, ...]:
    """Parse a target distribution over ``classes``; returns proportions summing to 1.

    ``""`` -> uniform; ``"1,1"`` -> one weight per class, in order; ``"male:0.3,female:0.7"`` -> by name
    (classes not named get 0). Weights are normalised.
    """
    names = list(classes)
    if not names:
        raise ValueError("parse_target needs at least one class")
    text = text.strip()
    if not text:
        return tuple(1.0 / len(names) for _ in names)
    parts = [part.strip() for part in text.split(",")]
    named = [":" in part for part in parts]
    if any(named) and not all(named):
        raise ValueError(f"target {text!r}: use either 'w1,w2,...' or 'name:w,...', not both")
    weights = [0.0] * len(names)
    if all(named):
        seen: set[str] = set()
        for part in parts:
            name, _, value = (s.strip() for s in part.partition(":"))
            if name not in names:
                raise ValueError(f"target {text!r}: unknown class {name!r}; classes are {names}")
            if name in seen:
                raise ValueError(f"target {text!r}: class {name!r} is given twice")
            seen.add(name)
            weights[names.index(name)] = _parse_weight(value, text)
    else:
        if len(parts) != len(names):
            raise ValueError(
                f"target {text!r}: expected {len(names)} weights (one per class {names}), got {len(parts)}"
            )
        weights = [_parse_weight(part, text) for part in parts]
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"target {text!r}: the weights sum to 0; give at least one positive weight")
    return tuple(w / total for w in weights)


def _parse_weight(value: str, text: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise ValueError(f"target {text!r}: {value!r} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"target {text!r}: weights must be finite and >= 0, got {value!r}")
    return weight


__all__ = [
    "EDIT_MODES",
    "KEEP",
    "OTHERS_MODES",
    "SUPPRESS",
    "EditMode",
    "EditSpec",
    "FeatureTable",
    "OthersMode",
    "apply_edit",
    "assign_classes",
    "edit_map",
    "feature_table",
    "parse_target",
]
