"""The three layouts of a hooked activation and the conversions between them (exact: only reshapes).

* map: ``(B, C, H, W)``, a UNet block's output (``C`` channels at ``H x W`` positions);
* tokens: ``(B, T, C)``, a DiT block's output (``T`` tokens of width ``C``);
* SAE inputs: ``(B, P, n_in)``, the ``P`` codes of each of ``B`` activations, and SAE rows ``(N, n_in)``,
  those of all activations one after another (what the trainer and ``SparseAutoencoder.encode`` read).

A per-token SAE (``kernel_size == 1``) codes every position or token: ``n_in = C`` and ``P = H * W`` (or
``T``), position ``(y, x)`` at ``p = y * W + x``. A K x K convolutional SAE (``kernel_size == K > 1``, the
DiffLens SD1.5 layout) codes a whole K x K map as one vector: ``P = 1``, ``n_in = C * K * K`` in
``(c, y, x)`` order. Tokens are a map of width 1: ``(B, T, C)`` <-> ``(B, C, T, 1)``.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor


def check_kernel_map(h: Tensor, kernel_size: int) -> None:
    """Raise ValueError unless ``h`` is a (B, C, H, W) map that a ``kernel_size`` SAE can code."""
    if h.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) map, got shape {tuple(h.shape)}")
    if kernel_size > 1 and tuple(h.shape[2:]) != (kernel_size, kernel_size):
        raise ValueError(
            f"this SAE has a {kernel_size}x{kernel_size} kernel and codes whole {kernel_size}x{kernel_size} "
            f"maps, but the map is {h.shape[2]}x{h.shape[3]}; generate at the resolution it was trained for "
            "or use a per-token SAE"
        )


def map_to_inputs(h: Tensor, kernel_size: int = 1) -> Tensor:
    """SAE inputs of maps. h: (B, C, H, W) -> (B, H*W, C) for kernel 1, (B, 1, C*K*K) for kernel K (H == W == K)."""
    check_kernel_map(h, kernel_size)
    if kernel_size == 1:
        return rearrange(h, "b c h w -> b (h w) c")
    return rearrange(h, "b c h w -> b 1 (c h w)")


def inputs_to_map(x: Tensor, height: int, width: int, kernel_size: int = 1) -> Tensor:
    """Inverse of :func:`map_to_inputs`. x: (B, H*W, C) or (B, 1, C*K*K) -> (B, C, height, width)."""
    if x.ndim != 3:
        raise ValueError(f"expected (B, P, n_in) SAE inputs, got shape {tuple(x.shape)}")
    if kernel_size == 1:
        return rearrange(x, "b (h w) c -> b c h w", h=height, w=width)
    return rearrange(x, "b 1 (c h w) -> b c h w", h=height, w=width)


def map_to_rows(h: Tensor, kernel_size: int = 1) -> Tensor:
    """SAE rows of maps. h: (B, C, H, W) -> (B*H*W, C) for kernel 1, (B, C*K*K) for kernel K (H == W == K)."""
    return map_to_inputs(h, kernel_size).flatten(0, 1)  # (B, P, n_in) -> (B*P, n_in)


def rows_to_map(rows: Tensor, height: int, width: int, kernel_size: int = 1) -> Tensor:
    """Inverse of :func:`map_to_rows`. rows: (B*H*W, C) or (B, C*K*K) -> (B, C, height, width)."""
    per = height * width if kernel_size == 1 else 1
    if rows.ndim != 2 or rows.shape[0] % per:
        raise ValueError(f"expected (B*{per}, n_in) SAE rows, got shape {tuple(rows.shape)}")
    return inputs_to_map(rows.reshape(rows.shape[0] // per, per, rows.shape[1]), height, width, kernel_size)


def tokens_to_map(t: Tensor) -> Tensor:
    """Tokens as a map of width 1 (one position per token). t: (B, T, C) -> (B, C, T, 1)."""
    if t.ndim != 3:
        raise ValueError(f"expected (B, T, C) tokens, got shape {tuple(t.shape)}")
    return rearrange(t, "b t c -> b c t 1")


def to_map(activations: Tensor) -> Tensor:
    """Maps (B, C, H, W) as they are; tokens (B, T, C) as (B, C, T, 1) maps (:func:`tokens_to_map`)."""
    return activations if activations.ndim == 4 else tokens_to_map(activations)


def map_to_tokens(h: Tensor) -> Tensor:
    """Positions of a map as tokens, row by row (the per-token SAE inputs). h: (B, C, H, W) -> (B, H*W, C)."""
    return map_to_inputs(h, 1)


def tokens_to_rows(t: Tensor) -> Tensor:
    """SAE rows of tokens (per-token SAE). t: (B, T, C) -> (B*T, C)."""
    if t.ndim != 3:
        raise ValueError(f"expected (B, T, C) tokens, got shape {tuple(t.shape)}")
    return t.flatten(0, 1)


def rows_to_tokens(rows: Tensor, tokens: int) -> Tensor:
    """Inverse of :func:`tokens_to_rows`. rows: (B*T, C) -> (B, T, C) with T = ``tokens``."""
    if rows.ndim != 2 or rows.shape[0] % tokens:
        raise ValueError(f"expected (B*{tokens}, C) SAE rows, got shape {tuple(rows.shape)}")
    return rows.reshape(rows.shape[0] // tokens, tokens, rows.shape[1])


def activations_to_rows(activations: Tensor, kernel_size: int = 1) -> Tensor:
    """SAE rows of any hooked activations.

    activations: (N, n_in) rows (returned as they are), (N, T, C) tokens -> (N*T, C) (kernel 1 only), or
    (N, C, H, W) maps -> :func:`map_to_rows`.
    """
    if activations.ndim == 2:
        return activations
    if activations.ndim == 3:
        if kernel_size != 1:
            raise ValueError(
                f"a {kernel_size}x{kernel_size}-kernel SAE codes (N, C, H, W) maps, not (N, T, C) tokens"
            )
        return tokens_to_rows(activations)
    if activations.ndim == 4:
        return map_to_rows(activations, kernel_size)
    raise ValueError(
        f"expected (N, n_in) rows, (N, T, C) tokens or (N, C, H, W) maps, got shape {tuple(activations.shape)}"
    )


__all__ = [
    "activations_to_rows",
    "check_kernel_map",
    "inputs_to_map",
    "map_to_inputs",
    "map_to_rows",
    "map_to_tokens",
    "rows_to_map",
    "rows_to_tokens",
    "tokens_to_map",
    "tokens_to_rows",
    "to_map",
]
