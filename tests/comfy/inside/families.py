"""Tiny random-weight models of every family in the README's hook table, built with ComfyUI's own classes.

Each :class:`Family` row names a ``comfy.supported_models`` config class and a shrunken version of the
config ComfyUI detects from a real checkpoint of that family (same block kinds and layout, widths of
32-128, two blocks per stage), the conditioning its ``comfy.model_base`` class reads, the latent shape it
samples, the hook points the plugin must report for it and the hook points the tests intervene at. A
two-step sampler run of a batch of four takes well under a second of CPU time for any of them.

The DiT widths differ from family to family and from every other width of their model (text, vector,
latent channels), so that a width read from the wrong attribute cannot pass by coincidence.
ComfyUI is imported inside the functions only: the parent pytest session imports this module without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..make_checkpoint import sd15_unet_config

F32 = torch.float32
CONTEXT_DIM = 32
"""Width of every family's text conditioning tokens (the text encoder's output)."""
POOLED_DIM = 24
"""Width of ``pooled_output`` where a family reads one (SDXL, Flux, SD3, HunyuanVideo)."""
TOKENS = 6
"""Text tokens per prompt."""


@dataclass(frozen=True)
class Family:
    """One model family of the README's hook table, as a tiny random model."""

    name: str
    """The README's name (``SD1.x``, ``Flux``, ...)."""
    family: str
    """What ``model_info.model_family`` must report (the name recorded in SAE files)."""
    config_class: str
    """Name of the ``comfy.supported_models`` class that builds it."""
    config: dict[str, Any]
    """``unet_config`` given to that class (a shrunken real config)."""
    latent: tuple[int, ...]
    """Latent of one image without the batch: (C, H, W), or (C, T, H, W) for video families."""
    blocks: str
    """Attribute of the diffusion model holding the blocks of ``dit.double.N`` ('' for UNets)."""
    hooks: str
    """Every hook point the plugin must report, folded as ``model_info.compact_hooks`` prints them."""
    probes: tuple[str, ...]
    """Hook points the tests intervene at: one of each kind the family offers."""
    pooled: bool = False
    """The conditioning carries a (1, POOLED_DIM) ``pooled_output``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further conditioning entries the family's model reads (``guidance``, ``attention_mask``, ...)."""

    def __str__(self) -> str:
        return self.name


def _unet(channels: int, linear: bool, depth: tuple[int, int], adm: int | None = None) -> dict:
    """The SD1.5 UNet config shrunk to two resolution levels of one res block each.

    linear: linear (SD2, SDXL) or 1x1-conv (SD1) transformer projections; depth: transformer blocks at
    each level (SDXL has none at the first); adm: width of the extra vector input (SDXL's pooled text
    and size embeddings), None for none.
    """
    config = sd15_unet_config(F32, model_channels=channels)
    config.update(
        num_res_blocks=[1, 1],
        channel_mult=[1, 2],
        transformer_depth=list(depth),
        transformer_depth_output=[depth[0], depth[0], depth[1], depth[1]],
        context_dim=CONTEXT_DIM,
        use_linear_in_transformer=linear,
        adm_in_channels=adm,
    )
    if adm:
        config["num_classes"] = "sequential"
    return config


def _flux_like(image_model: str, hidden: int, axes: list[int], **more) -> dict:
    """Flux-layout parameters (Flux, Chroma, HunyuanVideo): two double and two single blocks, two heads."""
    return {
        "image_model": image_model,
        "context_in_dim": CONTEXT_DIM,
        "hidden_size": hidden,
        "mlp_ratio": 2.0,
        "num_heads": 2,
        "depth": 2,
        "depth_single_blocks": 2,
        "axes_dim": axes,
        "qkv_bias": True,
        "dtype": F32,
        **more,
    }


# The two-level UNet: input blocks 0 (conv), 1 (res), 2 (downsample), 3 (res), the middle block, output
# blocks 0-3; the last output block has no hook (nothing follows it to patch).
_UNET_HOOKS = "unet.input.0-3, unet.middle, unet.output.0-2"
_UNET_PROBES = ("unet.input.1", "unet.middle", "unet.output.1")
_UNET_LATENT = (4, 4, 4)  # 4-channel latent, 32 px: 4x4 and 2x2 maps at the two levels
_IMAGE = (16, 8, 8)  # 16-channel latent, 64 px
_WAN = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "patch_size": (1, 2, 2),
    "text_len": TOKENS,
    "in_dim": 16,
    "dim": 112,
    "ffn_dim": 128,
    "freq_dim": 32,
    "text_dim": CONTEXT_DIM,
    "out_dim": 16,
    "num_heads": 2,
    "num_layers": 2,
    "dtype": F32,
}
_VIDEO = (16, 2, 8, 8)  # 16-channel latent, 2 latent frames of 64 px

FAMILIES: tuple[Family, ...] = (
    Family("SD1.x", "sd15", "SD15", _unet(32, False, (1, 1)), _UNET_LATENT, "", _UNET_HOOKS, _UNET_PROBES),
    Family(  # SD2 and SDXL: 64 channels, their classes' attention head width
        "SD2.x",
        "sd2",
        "SD20",
        _unet(64, True, (1, 1)),
        _UNET_LATENT,
        "",
        _UNET_HOOKS,
        _UNET_PROBES,
    ),
    Family(
        "SDXL",
        "sdxl",
        "SDXL",
        _unet(64, True, (0, 1), adm=POOLED_DIM + 6 * 256),
        _UNET_LATENT,
        "",
        _UNET_HOOKS,
        _UNET_PROBES,
        pooled=True,
        extra={"width": 32, "height": 32},
    ),
    Family(
        "Flux",
        "flux",
        "Flux",
        _flux_like(
            "flux",
            64,
            [8, 12, 12],
            in_channels=16,
            out_channels=16,
            patch_size=2,
            vec_in_dim=POOLED_DIM,
            theta=10000,
            guidance_embed=True,
        ),
        _IMAGE,
        "double_blocks",
        "dit.double.0-1, dit.single.0-1",
        ("dit.double.0", "dit.single.0"),
        pooled=True,
        extra={"guidance": 3.5},
    ),
    Family(
        "Chroma",
        "chroma",
        "Chroma",
        _flux_like(
            "chroma",
            96,
            [16, 16, 16],
            in_channels=64,
            out_channels=64,
            patch_size=2,
            theta=10000,
            in_dim=64,
            out_dim=96,
            hidden_dim=48,
            n_layers=1,
        ),
        _IMAGE,
        "double_blocks",
        "dit.double.0-1, dit.single.0-1",
        ("dit.double.0", "dit.single.0"),
        extra={"pooled_output": None},
    ),
    Family(
        "SD3",
        "sd3",
        "SD3",
        {  # MMDiT's width is 64 * depth; num_blocks gives two joint blocks at width 64
            "in_channels": 16,
            "out_channels": 16,
            "patch_size": 2,
            "depth": 1,
            "num_blocks": 2,
            "input_size": None,
            "adm_in_channels": POOLED_DIM,
            "num_patches": 64,
            "pos_embed_max_size": 8,
            "pos_embed_scaling_factor": None,
            "qk_norm": "rms",
            "x_block_self_attn_layers": [],
            "context_embedder_config": {
                "target": "torch.nn.Linear",
                "params": {"in_features": CONTEXT_DIM, "out_features": 64},
            },
            "dtype": F32,
        },
        _IMAGE,
        "joint_blocks",
        "dit.double.0-1",
        ("dit.double.0",),
        pooled=True,
    ),
    Family(
        "Qwen-Image",
        "qwen_image",
        "QwenImage",
        {
            "image_model": "qwen_image",
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 40,
            "num_attention_heads": 2,
            "joint_attention_dim": CONTEXT_DIM,
            "axes_dims_rope": (8, 16, 16),
            "dtype": F32,
        },
        (16, 1, 8, 8),
        "transformer_blocks",
        "dit.double.0-1",
        ("dit.double.0",),
    ),
    Family(
        "Wan",
        "wan",
        "WAN21_T2V",
        _WAN,
        _VIDEO,
        "blocks",
        "dit.double.0-1",
        ("dit.double.0",),
    ),
    Family(
        "LTXV",
        "ltxv",
        "LTXV",
        {
            "image_model": "ltxv",
            "in_channels": 128,
            "cross_attention_dim": 48,
            "attention_head_dim": 24,
            "num_attention_heads": 2,
            "caption_channels": CONTEXT_DIM,
            "num_layers": 2,
            "dtype": F32,
        },
        (128, 2, 2, 2),
        "transformer_blocks",
        "dit.double.0-1",
        ("dit.double.0",),
        extra={"frame_rate": 25, "attention_mask": torch.ones(1, TOKENS, dtype=torch.int64)},
    ),
    Family(
        "HunyuanVideo",
        "hunyuan_video",
        "HunyuanVideo",
        _flux_like(
            "hunyuan_video",
            128,
            [16, 24, 24],
            in_channels=16,
            out_channels=16,
            patch_size=[1, 2, 2],
            vec_in_dim=POOLED_DIM,
            theta=256,
            guidance_embed=True,
            byt5=False,
            meanflow=False,
        ),
        _VIDEO,
        "double_blocks",
        "dit.double.0-1",
        ("dit.double.0",),
        pooled=True,
        extra={"guidance": 6.0},
    ),
)


class Refused(NamedTuple):
    """A model the plugin offers no hook point on, and what its refusal must say."""

    family: Family
    """The model (``hooks`` empty; ``probes``: hook points a user would try)."""
    says: str
    """A phrase the nodes' message must hold besides the family name."""


REFUSED: tuple[Refused, ...] = (
    Refused(
        Family(
            "Wan 2.2 S2V",
            "wan_s2v",
            "WAN22_S2V",
            {**_WAN, "model_type": "s2v", "audio_dim": 16, "audio_inject_layers": [0], "cond_dim": 0},
            _VIDEO,
            "blocks",
            "",
            ("dit.double.0",),
        ),
        "without transformer_options",
    ),
    Refused(
        Family(  # a DiT with double and single blocks of a family outside the table
            "Hunyuan3D 2",
            "hunyuan3dv2",
            "Hunyuan3Dv2",
            {
                "image_model": "hunyuan3d2",
                "in_channels": 8,
                "context_in_dim": CONTEXT_DIM,
                "hidden_size": 64,
                "num_heads": 2,
                "depth": 1,
                "depth_single_blocks": 1,
                "dtype": F32,
            },
            (8, 16),
            "double_blocks",
            "",
            ("dit.double.0", "dit.single.0"),
        ),
        "diffbias edits UNets and the DiT families",
    ),
)
"""Models the plugin refuses: a variant of a family of the table whose seam is missing, a DiT outside it."""


def build(family: Family, seed: int = 0):
    """A CPU ModelPatcher of ``family``'s tiny model (``harness.tiny_model``: ComfyUI's config and model
    classes, seeded weights); float buffers (SD3's position table, created empty) get N(0, 0.02) values."""
    from .harness import tiny_model

    model = tiny_model(family.config_class, family.config, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for buffer in model.get_model_object("diffusion_model").buffers():
            if buffer.is_floating_point():
                buffer.copy_(0.02 * torch.randn(buffer.shape, generator=generator))
    return model


def conditioning(family: Family, seed: int) -> list:
    """A CONDITIONING for ``family``: seeded random (1, TOKENS, CONTEXT_DIM) text tokens and its extras."""
    generator = torch.Generator().manual_seed(seed)
    extra = dict(family.extra)
    if family.pooled:
        extra["pooled_output"] = torch.randn(1, POOLED_DIM, generator=generator)
    return [[torch.randn(1, TOKENS, CONTEXT_DIM, generator=generator), extra]]


def empty_latent(family: Family, batch: int) -> torch.Tensor:
    """(batch, *family.latent) zeros, the latent an empty-latent node of the family's size gives."""
    return torch.zeros(batch, *family.latent)


__all__ = [
    "CONTEXT_DIM",
    "FAMILIES",
    "REFUSED",
    "Refused",
    "TOKENS",
    "Family",
    "build",
    "conditioning",
    "empty_latent",
]
