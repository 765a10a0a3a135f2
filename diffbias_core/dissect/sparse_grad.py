"""TopK encoder and sparse decoder with sparse backward passes, for training.

A TopK SAE touches only k of its L latents per row, so the gradients of the encoder rows, the decoder
rows and the latent values are sparse too. Autograd through ``topk`` + ``embedding_bag`` gets them right
but slowly (``embedding_bag``'s weight gradient on CPU is slower than the whole encoder matmul); these two
functions compute the weight gradients with a sorted sparse (CSR) matrix product instead, and never build
a dense (rows, num_latents) gradient.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class RowPlan(NamedTuple):
    """The CSR layout of a sparse code's selections, shared by the encoder and decoder gradients.

    order: (R*n,) entries sorted by latent. columns: (R*n,) the row each sorted entry came from.
    crow: (num_rows + 1,) CSR row pointers. num_rows: L.
    """

    order: Tensor
    columns: Tensor
    crow: Tensor
    num_rows: int


def row_plan(indices: Tensor, num_rows: int) -> RowPlan:
    """The :class:`RowPlan` of indices: (R, n) int64, distinct entries per row, values in [0, num_rows)."""
    rows, n = indices.shape
    flat = indices.reshape(-1)  # (R*n,)
    order = flat.argsort(stable=True)
    columns = torch.arange(rows, device=indices.device).repeat_interleave(n)[order]  # (R*n,) source row ids
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=indices.device)
    crow[1:] = torch.bincount(flat, minlength=num_rows).cumsum(0)
    return RowPlan(order, columns, crow, num_rows)


def scatter_rows(plan: RowPlan, coef: Tensor, rhs: Tensor) -> Tensor:
    """out[l] = sum over (r, j) with indices[r, j] == l of coef[r, j] * rhs[r].

    plan: the :func:`row_plan` of indices (R, n); coef: (R, n); rhs: (R, D) -> (num_rows, D). A CSR
    (num_rows x R) matrix times rhs: the gradient of the rows a sparse code selected.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        values = coef.reshape(-1)[plan.order].to(rhs.dtype)
        matrix = torch.sparse_csr_tensor(plan.crow, plan.columns, values, (plan.num_rows, rhs.shape[0]))
        return matrix @ rhs


class _GatherEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, pre: Tensor, plan) -> Tensor:
        values = pre.gather(1, indices).clamp_min_(0)  # (R, n), the ReLU of the selected entries
        ctx.save_for_backward(x, weight, indices, values)
        ctx.plan = plan
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, indices, values = ctx.saved_tensors
        grad = grad * (values > 0)  # ReLU
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad.to(weight.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = scatter_rows(ctx.plan or row_plan(indices, weight.shape[0]), grad, x)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=grad.dtype, device=grad.device)
            grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_w, grad_b, None, None, None


def gather_encode(
    x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, pre: Tensor, plan: RowPlan | None = None
) -> Tensor:
    """relu(x @ weight.T + bias) at ``indices``, differentiable in x, weight and bias.

    x: (R, n_in); weight: (L, n_in); bias: (L,); indices: (R, n) distinct per row; pre: (R, L) the
    pre-activations ``x @ weight.T + bias`` of the same inputs, computed without autograd (ReLU'd or not:
    the ReLU is applied to the selected entries) -> (R, n) values >= 0. The backward touches only the selected
    rows. plan: :func:`row_plan` of indices, when the caller shares it with :func:`sparse_decode`.
    """
    return _GatherEncode.apply(x, weight, bias, indices, pre, plan)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, weight: Tensor, plan) -> Tensor:
        ctx.save_for_backward(indices, values, weight)
        ctx.plan = plan
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
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = scatter_rows(ctx.plan or row_plan(indices, weight.shape[0]), values, grad)
        return None, grad_values, grad_weight, None


def sparse_decode(indices: Tensor, values: Tensor, weight: Tensor, plan: RowPlan | None = None) -> Tensor:
    """sum_j values[r, j] * weight[indices[r, j]] (``embedding_bag``, as ``SparseAutoencoder.decode_sparse``).

    indices: (R, n) distinct per row; values: (R, n); weight: (L, n_in) -> (R, n_in), differentiable in
    values and weight with a sparse backward. plan: :func:`row_plan` of indices, if the caller has it.
    """
    return _SparseDecode.apply(indices, values.to(weight.dtype), weight, plan)


__all__ = ["RowPlan", "gather_encode", "row_plan", "scatter_rows", "sparse_decode"]
