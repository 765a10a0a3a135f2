"""The math of one training step: the TopK SAE's losses with sparse backward passes, and the decoder-row
constraints.

    loss = FVU + auxk_alpha * AuxK        FVU = |x - x_hat|^2 / |x - mean(x)|^2 over the batch

The code is the SAE's own (:meth:`SparseAutoencoder.pre_activations` and :meth:`SparseAutoencoder.select`,
the two halves of :meth:`SparseAutoencoder.encode`), computed without autograd; :mod:`.sparse_grad` then
gives the selected values and the reconstruction their sparse backward passes, so no dense
(rows, num_latents) gradient is formed. AuxK (Gao et al. 2024): the top ``n_in / 2`` dead latents
reconstruct the residual, which revives them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..sae.model import SparseAutoencoder
from .sparse_grad import gather_encode, row_plan, sparse_decode

VARIANCE_ROWS = 16
"""A batch with fewer rows measures FVU against the data's running per-row variance, not its own (one row
has none: its FVU would be |error|^2 / 0)."""


class Losses(NamedTuple):
    """The losses of one batch of B rows.

    fvu, auxk: () differentiable losses (auxk is 0 without dead latents). indices, values: (B, k) the code of
    every row, equal to ``SparseAutoencoder.encode`` of the rows (values detached). variance: () the batch's
    per-row variance |x - mean(x)|^2 / B (detached).
    """

    fvu: Tensor
    auxk: Tensor
    indices: Tensor
    values: Tensor
    variance: Tensor


def sae_losses(
    sae: SparseAutoencoder, x: Tensor, dead: Tensor, *, auxk_alpha: float, variance: float
) -> Losses:
    """FVU and AuxK of rows x: (B, n_in), differentiable in the SAE's weights.

    dead: (L,) bool, latents that have not fired for long (AuxK trains them; ignored when ``auxk_alpha`` is
    0). variance: the data's running per-row variance, used for batches of fewer than :data:`VARIANCE_ROWS`
    rows when it is > 0.
    """
    w_enc, w_dec = sae.w_enc_flat, sae.w_dec_flat
    sae_in = x - sae.b_dec_flat  # (B, n_in)
    with torch.no_grad():
        pre = sae.pre_activations(x)  # (B, L), as SparseAutoencoder.encode
        top_idx = sae.select(pre).indices  # (B, k), as SparseAutoencoder.encode
    plan = row_plan(top_idx, sae.num_latents)  # one sort serves the encoder and decoder gradients
    top_val = gather_encode(sae_in, w_enc, sae.b_enc, top_idx, pre, plan)  # (B, k)
    error = x - (sparse_decode(top_idx, top_val, w_dec, plan) + sae.b_dec_flat)  # (B, n_in)
    total = (x - x.mean(0)).pow(2).sum()
    batch_variance = total.detach() / x.shape[0]
    if x.shape[0] < VARIANCE_ROWS and variance > 0:  # a small last batch: the data's variance
        total = total.new_tensor(variance * x.shape[0])
    fvu = error.pow(2).sum() / total.clamp_min(torch.finfo(x.dtype).tiny)
    auxk = fvu.new_zeros(())
    num_dead = int(dead.sum()) if auxk_alpha > 0 else 0
    if num_dead:
        k_aux = max(1, sae.n_in // 2)
        scale = min(num_dead / k_aux, 1.0)
        aux_idx = pre.masked_fill(~dead, -math.inf).topk(min(k_aux, num_dead), dim=1, sorted=False).indices
        aux_plan = row_plan(aux_idx, sae.num_latents)
        aux_val = gather_encode(sae_in, w_enc, sae.b_enc, aux_idx, pre, aux_plan)  # (B, k_aux)
        residual = sparse_decode(aux_idx, aux_val, w_dec, aux_plan)  # (B, n_in), no bias: predicts the error
        auxk = scale * (residual - error.detach()).pow(2).sum() / total
    return Losses(fvu, auxk, top_idx, top_val.detach(), batch_variance)


def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's geometric median of points: (N, D) -> (D,)."""
    guess = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - guess).norm(dim=1).clamp_min(1e-8)  # (N,)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - guess).norm() <= tol * (1.0 + guess.norm()):
            return new
        guess = new
    return guess


def remove_parallel_component_(weight: Tensor, grad: Tensor) -> None:
    """grad[j] -= (grad[j] . w[j]) w[j] for every row j of unit-norm ``weight``: (L, n) each, in place."""
    grad -= (grad * weight).sum(1, keepdim=True) * weight


def normalize_rows_(weight: Tensor) -> None:
    """Scale every row of weight (L, n) to unit norm, in place."""
    weight /= weight.norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps


__all__ = [
    "VARIANCE_ROWS",
    "Losses",
    "geometric_median",
    "normalize_rows_",
    "remove_parallel_component_",
    "sae_losses",
]
