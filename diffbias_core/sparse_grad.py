"""TopK encoder and sparse decoder with sparse backward passes, for training.

A TopK SAE touches only k of its L latents per row, so the gradients of the encoder rows, the decoder
rows and the latent values are sparse too. Autograd through ``topk`` + ``embedding_bag`` gets them right
but slowly (``embedding_bag``'s weight gradient on CPU is slower than the whole encoder matmul); these two
functions compute the weight gradients with a sorted sparse (CSR) matrix product instead, and never build
a dense (rows, num_latents) gradient.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def scatter_rows(indices: Tensor, coef: Tensor, rhs: Tensor, num_rows: int) -> Tensor:
    """out[l] = sum over (r, j) with indices[r, j] == l of coef[r, j] * rhs[r].

    indices: (R, n) int64 with distinct entries per row, coef: (R, n), rhs: (R, D) -> (num_rows, D).
    A CSR (num_rows x R) matrix times rhs: the gradient of the rows a sparse code selected.
    """
    rows, n = indices.shape
    flat = indices.reshape(-1)  # (R*n,)
    order = flat.argsort(stable=True)
    columns = torch.arange(rows, device=indices.device).repeat_interleave(n)[order]  # (R*n,) source row ids
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=indices.device)
    crow[1:] = torch.bincount(flat, minlength=num_rows).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        matrix = torch.sparse_csr_tensor(
            crow, columns, coef.reshape(-1)[order].to(rhs.dtype), (num_rows, rows)
        )
        return matrix @ rhs


class _GatherEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, pre: Tensor) -> Tensor:
        values = pre.gather(1, indices).clamp_min_(0)  # (R, n), the ReLU of the selected entries
        ctx.save_for_backward(x, weight, indices, values)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, indices, values = ctx.saved_tensors
        grad = grad * (values > 0)  # ReLU
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad.to(weight.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = scatter_rows(indices, grad, x, weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=grad.dtype, device=grad.device)
            grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_w, grad_b, None, None


def encoder_pre(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Dense pre-activations (before the ReLU) without autograd. x: (R, n_in), weight: (L, n_in) -> (R, L).

    The ReLU is monotonic, so the TopK of these is the TopK of the ReLU'd ones; it is applied to the
    selected entries only.
    """
    with torch.no_grad():
        return F.linear(x, weight, bias)


def gather_encode(x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, pre: Tensor) -> Tensor:
    """relu(x @ weight.T + bias) at ``indices``, differentiable in x, weight and bias.

    x: (R, n_in); weight: (L, n_in); bias: (L,); indices: (R, n) distinct per row; pre: (R, L) the
    :func:`encoder_pre` of the same inputs -> (R, n) values >= 0. The backward touches only the selected rows.
    """
    return _GatherEncode.apply(x, weight, bias, indices, pre)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(indices, values, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")  # (R, n_in)

    @staticmethod
    def backward(ctx, grad: Tensor):
        indices, values, weight = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[1]:  # embedding_bag's own per-sample-weight gradient: fused, no gathered copy
            with torch.enable_grad():
                leaf = values.detach().requires_grad_()
                out = F.embedding_bag(indices, weight.detach(), per_sample_weights=leaf, mode="sum")
                (grad_values,) = torch.autograd.grad(out, leaf, grad)
        grad_weight = (
            scatter_rows(indices, values, grad, weight.shape[0]) if ctx.needs_input_grad[2] else None
        )
        return None, grad_values, grad_weight


def sparse_decode(indices: Tensor, values: Tensor, weight: Tensor) -> Tensor:
    """sum_j values[r, j] * weight[indices[r, j]] (``embedding_bag``, as ``SparseAutoencoder.decode_sparse``).

    indices: (R, n) distinct per row; values: (R, n); weight: (L, n_in) -> (R, n_in), differentiable in
    values and weight with a sparse backward.
    """
    return _SparseDecode.apply(indices, values.to(weight.dtype), weight)


__all__ = ["encoder_pre", "gather_encode", "scatter_rows", "sparse_decode"]
