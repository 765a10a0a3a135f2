"""The toy model's latent space as pictures a person can see, and back (ComfyUI's VAE and IMAGE layout).

The toy diffuses 16 x 16 images in model space (brightness and scaled chroma, see
``diffusion.to_model_space``); a "latent" here is that model-space image. Pictures are ComfyUI
IMAGE tensors: (B, H, W, 3) float in [0, 1], the world's pixels repeated ``scale`` times each way
(nearest), so that reading them back at the world's size is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .diffusion import to_model_space, to_rgb

DISPLAY_SCALE = 8
"""Picture pixels per world pixel (16 x 16 -> 128 x 128), the latent-to-pixel ratio of ComfyUI's SD VAEs."""


def latent_to_picture(latent: Tensor, chroma_scale: float, scale: int = DISPLAY_SCALE) -> Tensor:
    """latent: (B, 3, h, w) model space -> (B, h*scale, w*scale, 3) float32 in [0, 1]."""
    rgb = to_rgb(latent.float(), chroma_scale).clamp(-1, 1)  # (B, 3, h, w) in [-1, 1]
    big = rgb.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # (B, 3, h*s, w*s)
    return ((big + 1) / 2).permute(0, 2, 3, 1).contiguous()  # (B, H, W, 3)


def picture_to_world(pictures: Tensor, size: int) -> Tensor:
    """pictures: (B, H, W, C>=3) in [0, 1] -> (B, 3, size, size) RGB in [-1, 1].

    When H and W are multiples of ``size`` the centre pixel of each block is taken (exact for a
    picture from :func:`latent_to_picture`); otherwise the picture is area-resampled to ``size``.
    """
    images = pictures[..., :3].float().permute(0, 3, 1, 2)  # (B, 3, H, W)
    h, w = images.shape[-2:]
    if h % size == 0 and w % size == 0:
        images = images[
            :, :, (h // size) // 2 :: h // size, (w // size) // 2 :: w // size
        ]  # (B, 3, size, size)
    else:
        images = F.interpolate(images, size=(size, size), mode="area")
    return images.clamp(0, 1) * 2 - 1


def picture_to_latent(pictures: Tensor, chroma_scale: float, scale: int = DISPLAY_SCALE) -> Tensor:
    """pictures: (B, H, W, C>=3) in [0, 1] -> (B, 3, H/scale, W/scale) model-space latent.

    The inverse of :func:`latent_to_picture` for its pictures (up to the [-1, 1] clamp). H and W must be
    multiples of ``scale``.
    """
    h, w = pictures.shape[1:3]
    if h % scale or w % scale:
        raise ValueError(
            f"the toy world's pictures are {scale} pixels per latent pixel: height and width must be multiples of "
            f"{scale}, got {h}x{w}; resize the image first (e.g. to 128x128)"
        )
    images = pictures[..., :3].float().permute(0, 3, 1, 2)  # (B, 3, H, W)
    small = images[:, :, scale // 2 :: scale, scale // 2 :: scale]  # (B, 3, H/scale, W/scale)
    return to_model_space(small * 2 - 1, chroma_scale)


def latent_rgb_factors(chroma_scale: float) -> list[list[float]]:
    """Per latent channel, its [r, g, b] contribution (rows: channels): the linear map of ``to_rgb``,
    for ComfyUI's live previews."""
    inverse = to_rgb(torch.eye(3).view(3, 3, 1, 1), chroma_scale)  # (channel, rgb, 1, 1)
    return inverse[:, :, 0, 0].tolist()


__all__ = [
    "DISPLAY_SCALE",
    "latent_rgb_factors",
    "latent_to_picture",
    "picture_to_latent",
    "picture_to_world",
]
