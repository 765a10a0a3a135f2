"""The toy diffusion UNet: a small conditional UNet with a bottleneck ("h-space") and cross-attention.

Layout for a 16 x 16 image with widths (c0, c1, c2)::

    in conv 3 -> c0                       16x16
    down0  ResBlock(c0)            skip   16x16
    down   conv stride 2 -> c1             8x8
    down1  ResBlock(c1)            skip    8x8
    down   conv stride 2 -> c2             4x4
    down2  ResBlock(c2)            skip    4x4
    middle ResBlock, self-attention, cross-attention to the prompt, ResBlock   4x4  <- hook ``unet.middle``
    up2    ResBlock(2 c2 -> c2), transposed conv -> c1
    up1    ResBlock(2 c1 -> c1), transposed conv -> c0
    up0    ResBlock(2 c0 -> c0), out conv -> 3

The prompt enters only through the cross-attention in the middle block, so everything the prompt
decides (shape, colour) passes through the bottleneck, as in Stable Diffusion's h-space.
The network predicts v (``v = alpha * noise - sigma * x0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .world import PROMPT_LENGTH, VOCAB

HOOK_MODULES = {"unet.middle": "middle"}
"""Hook point name (docs/ARCHITECTURE.md) -> attribute path of the module whose output it is."""
MODEL_FAMILY = "toy"


@dataclass(frozen=True)
class UNetConfig:
    """Widths of the toy UNet."""

    image_size: int = 16
    """Input side in pixels; divisible by 4."""
    widths: tuple[int, int, int] = (32, 48, 64)
    """Channels at full, half and quarter resolution; the last is the bottleneck width."""
    text_dim: int = 32
    """Width of the learned prompt-token embedding."""
    time_dim: int = 64
    """Width of the timestep embedding."""
    heads: int = 4
    """Attention heads in the middle block (must divide widths[2])."""
    chroma_scale: float = 0.4
    """The diffusion runs on (brightness, gamma * chroma) coordinates of the RGB image, gamma in (0, 1]:
    a small gamma hides colour under the noise for longer, so sampling settles where a shape goes
    (brightness) before which colour it gets, and a colour edit leaves the layout alone."""

    def __post_init__(self) -> None:
        if self.image_size % 4 or self.image_size < 8:
            raise ValueError(f"image_size must be a multiple of 4 and >= 8, got {self.image_size}")
        if len(self.widths) != 3 or any(w < 8 or w % 8 for w in self.widths):
            raise ValueError(f"widths must be 3 multiples of 8, got {self.widths}")
        if not 0.0 < self.chroma_scale <= 1.0:
            raise ValueError(f"chroma_scale must be in (0, 1], got {self.chroma_scale}")
        if self.widths[2] % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide the bottleneck width {self.widths[2]}")

    @property
    def bottleneck_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the ``unet.middle`` activation."""
        return (self.widths[2], self.image_size // 4, self.image_size // 4)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding. t: (B,) float in [0, 1] -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(1) * 1000.0 * freqs.unsqueeze(0)  # (B, half)
    return torch.cat([args.sin(), args.cos()], dim=1).to(t.dtype if t.is_floating_point() else torch.float32)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, c)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, timestep added in between, 1x1 skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, time_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x: (B, c_in, H, W), temb: (B, time_dim) -> (B, c_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head attention from a spatial map to a context (itself when ``context_dim`` is None)."""

    def __init__(self, channels: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim or channels, 2 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); context: (B, T, context_dim) or None -> (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        source = tokens if context is None else context
        q = rearrange(self.q(tokens), "b n (g d) -> b g n d", g=self.heads)
        k, v = rearrange(self.kv(source), "b t (two g d) -> two b g t d", two=2, g=self.heads)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, G, HW, D)
        out = self.out(rearrange(attended, "b g n d -> b n (g d)"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class MiddleBlock(nn.Module):
    """Bottleneck: ResBlock, self-attention, cross-attention to the prompt, ResBlock. Its output is h-space."""

    def __init__(self, channels: int, time_dim: int, text_dim: int, heads: int) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, time_dim)
        self.self_attn = Attention(channels, heads)
        self.cross_attn = Attention(channels, heads, context_dim=text_dim)
        self.res2 = ResBlock(channels, channels, time_dim)

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        """x: (B, C, h, w), temb: (B, time_dim), context: (B, T, text_dim) -> (B, C, h, w)."""
        x = self.res1(x, temb)
        x = self.cross_attn(self.self_attn(x), context)
        return self.res2(x, temb)


def embed_tokens(token_embedding: nn.Embedding, position_embedding: Tensor, prompt: Tensor) -> Tensor:
    """The prompt embedding. prompt: (B, T) int64 ids -> (B, T, text_dim): token plus position embedding."""
    return token_embedding(prompt) + position_embedding[: prompt.shape[1]]


class BlockSeams:
    """Places between the UNet's blocks where a caller may act (identity here; a subclass overrides).

    :meth:`ToyUNet.denoise` calls ``enter(stage, index)`` before each block (stage ``input``,
    ``middle`` or ``output``), ``after_input`` on each input block's output and ``before_output`` on
    what enters each output block (the running activation and the skip it is concatenated with).
    Output block 0 receives the middle block's output: hook point ``unet.middle``.
    """

    def enter(self, stage: str, index: int) -> None:
        """Called before block ``index`` of ``stage`` runs."""

    def after_input(self, index: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """h: (B, C, H, W) output of input block ``index`` -> (the skip kept, the activation going on)."""
        return h, h

    def before_output(self, index: int, h: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
        """h, skip: (B, C, H, W) entering output block ``index`` -> (h, skip), possibly changed."""
        return h, skip


_NO_SEAMS = BlockSeams()


class ToyUNet(nn.Module):
    """Conditional v-prediction UNet for the toy world. See the module docstring for the layout."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or UNetConfig()
        c0, c1, c2 = config.widths
        td = config.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.token_embedding = nn.Embedding(len(VOCAB), config.text_dim)
        self.position_embedding = nn.Parameter(torch.zeros(PROMPT_LENGTH, config.text_dim))
        self.conv_in = nn.Conv2d(3, c0, 3, padding=1)
        self.down0 = ResBlock(c0, c0, td)
        self.pool0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down1 = ResBlock(c1, c1, td)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, td)
        self.middle = MiddleBlock(c2, td, config.text_dim, config.heads)
        self.up2 = ResBlock(2 * c2, c2, td)
        self.unpool1 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.up1 = ResBlock(2 * c1, c1, td)
        self.unpool0 = nn.ConvTranspose2d(c1, c0, 2, stride=2)
        self.up0 = ResBlock(2 * c0, c0, td)
        self.norm_out = _norm(c0)
        self.conv_out = nn.Conv2d(c0, 3, 3, padding=1)

        # The blocks in order (plain tuples: the modules stay registered once, under the names above).
        self.input_blocks = ((self.conv_in, self.down0), (self.pool0, self.down1), (self.pool1, self.down2))
        """Per input block: (the layer in front, the ResBlock); block i's output is skip i."""
        self.output_blocks = ((self.up2, self.unpool1), (self.up1, self.unpool0), (self.up0,))
        """Per output block: the ResBlock on [h, skip] (concatenated), then the upsampling layer if any."""

    def embed_prompt(self, prompt: Tensor) -> Tensor:
        """prompt: (B, PROMPT_LENGTH) int64 token ids -> (B, PROMPT_LENGTH, text_dim)."""
        return embed_tokens(self.token_embedding, self.position_embedding, prompt)

    def forward(self, x: Tensor, t: Tensor, prompt: Tensor) -> Tensor:
        """x: (B, 3, S, S) noisy image, t: (B,) in [0, 1], prompt: (B, PROMPT_LENGTH) -> v (B, 3, S, S)."""
        return self.denoise(x, t, self.embed_prompt(prompt))

    def denoise(self, x: Tensor, t: Tensor, context: Tensor, seams: BlockSeams | None = None) -> Tensor:
        """The network on an embedded prompt, with ``seams`` called between the blocks.

        x: (B, 3, S, S), t: (B,) in [0, 1], context: (B, T, text_dim) -> v (B, 3, S, S).
        """
        seams = seams or _NO_SEAMS
        temb = self.time_mlp(timestep_embedding(t, self.config.time_dim).to(x.dtype))
        skips = []
        h = x
        for index, (layer, res) in enumerate(self.input_blocks):
            seams.enter("input", index)
            skip, h = seams.after_input(index, res(layer(h), temb))
            skips.append(skip)
        seams.enter("middle", 0)
        h = self.middle(h, temb, context)
        for index, (res, *up) in enumerate(self.output_blocks):
            seams.enter("output", index)
            h, skip = seams.before_output(index, h, skips.pop())
            h = res(torch.cat([h, skip], 1), temb)
            h = up[0](h) if up else h
        return self.conv_out(F.silu(self.norm_out(h)))


def hook_module(model: ToyUNet, hook: str) -> nn.Module:
    """The submodule whose output is hook point ``hook`` (only ``unet.middle`` exists in the toy)."""
    if hook not in HOOK_MODULES:
        raise ValueError(f"the toy UNet has hook points {sorted(HOOK_MODULES)}, not {hook!r}")
    return model.get_submodule(HOOK_MODULES[hook])


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "HOOK_MODULES",
    "MODEL_FAMILY",
    "BlockSeams",
    "ToyUNet",
    "embed_tokens",
    "UNetConfig",
    "count_parameters",
    "hook_module",
]
