"""Noise schedule, training loss and the DDIM sampler of the toy model.

Continuous time t in [0, 1] with the cosine schedule: alpha(t) = cos(pi/2 * (t + s) / (1 + s)),
sigma(t) = sqrt(1 - alpha^2), x_t = alpha x0 + sigma noise. The model predicts
v = alpha noise - sigma x0. Sampling is deterministic DDIM (eta = 0) on an even grid from t = 1.

The diffusion runs in "model space": the RGB image in an orthonormal (brightness, chroma 1,
chroma 2) basis with the two chroma axes scaled by ``chroma_scale`` (see ``UNetConfig``). The loss
takes RGB images and the sampler returns RGB images; only the model sees model space.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

_OFFSET = 0.008

StepCallback = Callable[[int, float], None]
"""Called as ``callback(step_index, t)`` before each model evaluation of a sampling run."""


def alpha_sigma(t: Tensor) -> tuple[Tensor, Tensor]:
    """Signal and noise scales. t: (B,) in [0, 1] -> alpha (B,), sigma (B,)."""
    alpha = torch.cos(0.5 * math.pi * (t + _OFFSET) / (1 + _OFFSET)).clamp(0.0, 1.0)
    sigma = (1 - alpha.pow(2)).clamp_min(0.0).sqrt()
    return alpha, sigma


SIGMA_MAX = 10000.0
"""Largest noise level of the schedule in the sigma-over-alpha ("EDM") form that ComfyUI samples in:
sigma(t) = sigma_vp(t) / alpha(t) is infinite at t = 1, so t = 1 (pure noise) stands at this sigma (large
enough that the first step matches pure noise closely, small enough for float32 Euler steps)."""


def edm_sigma(t: Tensor) -> Tensor:
    """Noise level in the form x = x0 + sigma noise: sigma_vp / alpha, capped at SIGMA_MAX. t: any shape."""
    angle = 0.5 * math.pi * (t.double() + _OFFSET) / (1 + _OFFSET)
    return (
        torch.tan(angle.clamp(max=0.5 * math.pi))
        .clamp(0.0, SIGMA_MAX)
        .to(t.dtype if t.is_floating_point() else torch.float32)
    )


def edm_time(sigma: Tensor) -> Tensor:
    """Inverse of :func:`edm_sigma`: the time t in [0, 1] of a noise level (SIGMA_MAX and above: t = 1)."""
    angle = torch.atan(sigma.double())  # alpha = cos(angle), sigma_vp = sin(angle)
    t = (angle * 2 / math.pi * (1 + _OFFSET) - _OFFSET).clamp(0.0, 1.0)
    return torch.where(sigma.double() >= SIGMA_MAX, torch.ones_like(t), t).to(sigma.dtype)


def colour_basis(chroma_scale: float) -> Tensor:
    """(3, 3) matrix from RGB to model space: rows brightness, gamma * chroma 1, gamma * chroma 2."""
    basis = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]])
    basis = basis / basis.norm(dim=1, keepdim=True)  # orthonormal rows
    return basis * torch.tensor([1.0, chroma_scale, chroma_scale]).view(3, 1)


def to_model_space(rgb: Tensor, chroma_scale: float) -> Tensor:
    """rgb: (B, 3, S, S) -> (B, 3, S, S) model-space image."""
    return torch.einsum("ij,bjhw->bihw", colour_basis(chroma_scale).to(rgb), rgb)


def to_rgb(y: Tensor, chroma_scale: float) -> Tensor:
    """Inverse of :func:`to_model_space`. y: (B, 3, S, S) -> (B, 3, S, S) RGB."""
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(colour_basis(chroma_scale)).to(y), y)


def chroma_scale_of(model: nn.Module) -> float:
    """The model's ``config.chroma_scale`` (1.0, plain RGB, for a module without one)."""
    config = getattr(model, "config", None)
    return float(getattr(config, "chroma_scale", 1.0))


def v_loss(model: nn.Module, x0: Tensor, prompt: Tensor, generator: torch.Generator) -> Tensor:
    """Mean squared v-prediction error in model space. x0: (B, 3, S, S) RGB, prompt: (B, PROMPT_LENGTH) -> scalar."""
    x0 = to_model_space(x0, chroma_scale_of(model))
    b = x0.shape[0]
    t = torch.rand(b, generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, sigma = (a.view(-1, 1, 1, 1).to(x0.dtype) for a in alpha_sigma(t))
    x_t = alpha * x0 + sigma * noise
    target = alpha * noise - sigma * x0
    return (model(x_t, t, prompt) - target).pow(2).mean()


def timesteps(steps: int) -> Tensor:
    """Sampling grid: (steps + 1,) from 1 down to 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1)


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    prompt: Tensor,
    noise: Tensor,
    steps: int,
    callback: StepCallback | None = None,
) -> Tensor:
    """Deterministic DDIM from ``noise`` to images.

    prompt: (B, PROMPT_LENGTH) int64, noise: (B, 3, S, S) model-space noise -> RGB images (B, 3, S, S)
    in [-1, 1]. ``callback(i, t)`` runs before the i-th model evaluation (i = 0 is the noisiest), so a
    hook on the model can tell which step it is in. The clean estimate is clipped to [-1, 1] in RGB.
    """
    gamma = chroma_scale_of(model)
    grid = timesteps(steps)
    x = noise
    b = noise.shape[0]
    for i in range(steps):
        t, s = float(grid[i]), float(grid[i + 1])
        if callback is not None:
            callback(i, t)
        t_vec = torch.full((b,), t, device=noise.device, dtype=noise.dtype)
        a_t, s_t = alpha_sigma(t_vec[:1])
        a_s, s_s = alpha_sigma(torch.full((1,), s))
        v = model(x, t_vec, prompt)
        x0 = to_model_space(to_rgb(a_t * x - s_t * v, gamma).clamp(-1, 1), gamma)
        if i == steps - 1:  # the last step returns the clean estimate (sigma(0) is small, not 0)
            return to_rgb(x0, gamma).clamp(-1, 1)
        eps = (x - a_t * x0) / s_t.clamp_min(1e-4)
        x = a_s.to(x.dtype) * x0 + s_s.to(x.dtype) * eps
    return to_rgb(x, gamma).clamp(-1, 1)


def initial_noise(n: int, image_size: int, seed: int) -> Tensor:
    """Reproducible starting noise (n, 3, S, S) from ``seed``; the same seed gives the same twins."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, image_size, image_size, generator=generator)


ChunkCallback = Callable[[slice, int, float], None]
"""Called as ``callback(rows, step_index, t)``: ``rows`` are the batch rows being sampled."""


def sample_in_chunks(
    model: nn.Module,
    prompt: Tensor,
    noise: Tensor,
    steps: int,
    *,
    chunk: int = 500,
    callback: ChunkCallback | None = None,
    on_chunk_done: Callable[[int], None] | None = None,
) -> Tensor:
    """:func:`ddim_sample` over row chunks of at most ``chunk`` images.

    prompt: (N, PROMPT_LENGTH), noise: (N, 3, S, S) -> (N, 3, S, S). ``on_chunk_done(n)`` reports
    progress (n images finished).
    """
    if prompt.shape[0] != noise.shape[0]:
        raise ValueError(f"prompt has {prompt.shape[0]} rows but noise has {noise.shape[0]}")
    outputs = []
    for start in range(0, noise.shape[0], chunk):
        rows = slice(start, min(start + chunk, noise.shape[0]))
        step_cb = None if callback is None else (lambda i, t, rows=rows: callback(rows, i, t))
        outputs.append(ddim_sample(model, prompt[rows], noise[rows], steps, step_cb))
        if on_chunk_done is not None:
            on_chunk_done(rows.stop - rows.start)
    return torch.cat(outputs) if outputs else noise.clone()


__all__ = [
    "SIGMA_MAX",
    "ChunkCallback",
    "StepCallback",
    "alpha_sigma",
    "chroma_scale_of",
    "colour_basis",
    "ddim_sample",
    "edm_sigma",
    "edm_time",
    "initial_noise",
    "sample_in_chunks",
    "timesteps",
    "to_model_space",
    "to_rgb",
    "v_loss",
]
