"""What a loaded ComfyUI model is: its family, its hook points and the width of each.

Reads the model through ``ModelPatcher.get_model_object`` only (never ``model.model``), so object
patches are respected. Hook point names follow docs/ARCHITECTURE.md ("Hook points"): ``unet.middle``, ``unet.input.N``,
``unet.output.N``, ``dit.double.N``, ``dit.single.N``.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

import torch

Stage = Literal["middle", "input", "output", "double", "single"]

# model_config class name (or a base class name) -> family name recorded in SAE files.
_FAMILIES = {
    "SD15": "sd15",
    "SD20": "sd2",
    "SDXLRefiner": "sdxl_refiner",
    "SDXL": "sdxl",
    "SD3": "sd3",
    "Flux": "flux",
    "Chroma": "chroma",
    "HunyuanVideo": "hunyuan_video",
    "LTXV": "ltxv",
    "WAN22_S2V": "wan_s2v",
    "WAN21_T2V": "wan",
    "QwenImage": "qwen_image",
    "AuraFlow": "auraflow",
    "HiDream": "hidream",
    "Lumina2": "lumina2",
    "PixArtAlpha": "pixart",
    "CosmosT2V": "cosmos",
    "CosmosT2IPredict2": "cosmos",
}
# DiT families whose block replace patches the plugin edits: each is sampled with an edit at every hook kind
# by tests/comfy/inside/test_families.py. A DiT of any other family gets no hook point.
_DIT_FAMILIES = ("flux", "chroma", "sd3", "qwen_image", "wan", "ltxv", "hunyuan_video")
# Why a model of a family with blocks offers no hook point (ComfyUI 0.3.64).
_NO_HOOKS_REASON = {
    "wan_s2v": (
        "Wan 2.2 S2V calls its block replace patches without transformer_options (comfy/ldm/wan/model.py, "
        "WanModel_S2V), so an edit cannot tell the conditional rows of a batch from the unconditional ones"
    ),
}
# Families whose diffusion model offers ("single_block", i) replace patches (text tokens first).
_SINGLE_BLOCK_FAMILIES = frozenset({"flux", "chroma"})
# Attribute names of the block list that ("double_block", i) patches index, per DiT implementation.
_DOUBLE_BLOCK_LISTS = ("double_blocks", "joint_blocks", "transformer_blocks", "blocks")
_DIT_WIDTH_ATTRS = ("hidden_size", "inner_dim", "dim")
_HOOK_RE = re.compile(
    r"^(?:unet\.(?P<mid>middle)|unet\.(?P<unet>input|output)\.(?P<ui>[0-9]{1,3})"
    r"|dit\.(?P<dit>double|single)\.(?P<di>[0-9]{1,3}))$"
)


class HookPoint(NamedTuple):
    """A parsed hook point name."""

    name: str
    """Canonical name, e.g. ``unet.middle`` or ``dit.single.3``."""
    stage: Stage
    """UNet ``middle``/``input``/``output`` block, or DiT ``double``/``single`` block."""
    index: int
    """Block index (0 for ``middle``)."""

    @property
    def is_unet(self) -> bool:
        """True for ``unet.*`` hook points."""
        return self.stage in ("middle", "input", "output")


class ModelInfo(NamedTuple):
    """Facts about a ComfyUI model that decide where an SAE can hook."""

    family: str
    """Family name (``sd15``, ``sdxl``, ``flux``, ...; the config class name, lowercased, if unknown)."""
    architecture: Literal["unet", "dit", "other"]
    """``unet`` (openaimodel UNet), ``dit`` (a transformer with ``dit`` block replace patches), ``other``."""
    hooks: tuple[str, ...]
    """Every hook point name this model supports, in block order."""


def parse_hook(text: str) -> HookPoint:
    """Parse a hook point name; ValueError naming the accepted forms if it is not one."""
    match = _HOOK_RE.match(text.strip())
    if match is None:
        raise ValueError(
            f"hook point {text!r} is not one of 'unet.middle', 'unet.input.N', 'unet.output.N', "
            "'dit.double.N', 'dit.single.N' (N a block number below 1000); for an imported SAE that records no hook point, "
            "type it into Load Bias SAE's 'hook_override' input"
        )
    if match["mid"]:
        return HookPoint("unet.middle", "middle", 0)
    if match["unet"]:
        index = int(match["ui"])
        return HookPoint(f"unet.{match['unet']}.{index}", match["unet"], index)
    index = int(match["di"])
    return HookPoint(f"dit.{match['dit']}.{index}", match["dit"], index)


def model_family(model) -> str:
    """Family name of a ComfyUI ModelPatcher, from its model_config class (and its bases)."""
    config = model.get_model_object("model_config")
    for cls in type(config).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__]
    return type(config).__name__.lower()


def _diffusion_model(model) -> torch.nn.Module:
    return model.get_model_object("diffusion_model")


def _is_unet(net: torch.nn.Module) -> bool:
    return all(hasattr(net, name) for name in ("input_blocks", "middle_block", "output_blocks"))


def _double_blocks(net: torch.nn.Module) -> torch.nn.ModuleList | None:
    for name in _DOUBLE_BLOCK_LISTS:
        blocks = getattr(net, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    return None


def describe(model) -> ModelInfo:
    """Family, architecture and hook points of a ComfyUI ModelPatcher."""
    family = model_family(model)
    net = _diffusion_model(model)
    if _is_unet(net):
        hooks = (
            [f"unet.input.{i}" for i in range(len(net.input_blocks))]
            + ["unet.middle"]
            + [f"unet.output.{i}" for i in range(len(net.output_blocks) - 1)]
        )
        return ModelInfo(family, "unet", tuple(hooks))
    doubles = _double_blocks(net)
    if doubles is None or family not in _DIT_FAMILIES:
        return ModelInfo(family, "other", ())
    hooks = [f"dit.double.{i}" for i in range(len(doubles))]
    singles = getattr(net, "single_blocks", None)
    if family in _SINGLE_BLOCK_FAMILIES and isinstance(singles, torch.nn.ModuleList):
        hooks += [f"dit.single.{i}" for i in range(len(singles))]
    return ModelInfo(family, "dit", tuple(hooks))


def _block_out_channels(block: torch.nn.Module) -> int | None:
    """Channels leaving a UNet block: the last child that declares ``out_channels``."""
    for child in reversed(list(block.modules())):
        value = getattr(child, "out_channels", None)
        if isinstance(value, int) and not isinstance(child, torch.nn.modules.conv._ConvNd | torch.nn.Linear):
            return value
    for child in reversed(list(block.modules())):
        if isinstance(child, torch.nn.modules.conv._ConvNd):
            return child.out_channels
    return None


def hook_width(model, hook: HookPoint) -> int | None:
    """Channel width of the activation at ``hook`` (None when the model does not tell without running)."""
    net = _diffusion_model(model)
    if hook.is_unet:
        if not _is_unet(net):
            return None
        if hook.stage == "middle":
            return _block_out_channels(net.middle_block)
        blocks = net.input_blocks if hook.stage == "input" else net.output_blocks
        return _block_out_channels(blocks[hook.index]) if hook.index < len(blocks) else None
    for name in _DIT_WIDTH_ATTRS:
        value = getattr(net, name, None)
        if isinstance(value, int):
            return value
    return None


def no_hooks_reason(info: ModelInfo) -> str:
    """Why a model whose ``describe`` lists no hook point has none, naming its family."""
    if info.family in _NO_HOOKS_REASON:
        return _NO_HOOKS_REASON[info.family]
    return (
        f"diffbias edits UNets and the DiT families {', '.join(_DIT_FAMILIES)}; "
        f"this {info.family!r} model is none of them"
    )


def compact_hooks(hooks: tuple[str, ...]) -> str:
    """``unet.input.0-11, unet.middle, unet.output.0-10``: hook names with numbered runs folded."""
    groups: dict[str, list[int]] = {}
    for name in hooks:
        prefix, _, number = name.rpartition(".")
        if number.isdigit():
            groups.setdefault(prefix, []).append(int(number))
        else:
            groups.setdefault(name, [])
    return ", ".join(
        f"{prefix}.{min(numbers)}-{max(numbers)}" if numbers else prefix for prefix, numbers in groups.items()
    )


def check_hook(
    model, hook: HookPoint, sae_width: int | None = None, sae_family: str | None = None
) -> ModelInfo:
    """Raise ValueError (saying what to change) unless ``hook`` exists on ``model`` with ``sae_width``.

    ``sae_family``: the family an SAE was trained on; "unknown"/None/"" skip the family check.
    """
    info = describe(model)
    if not info.hooks:
        raise ValueError(
            f"this {info.family} model offers no hook point for {hook.name!r}: {no_hooks_reason(info)}"
        )
    if hook.name not in info.hooks:
        raise ValueError(
            f"hook point {hook.name!r} does not exist on this {info.family} model ({info.architecture}); "
            f"it has: {compact_hooks(info.hooks)}. "
            "Use an SAE trained on this model, or pick one of these hook points when training."
        )
    if sae_family and sae_family not in ("unknown", info.family):
        raise ValueError(
            f"the SAE was trained on a {sae_family!r} model but this model is {info.family!r}; "
            "its features mean nothing here: load an SAE trained on this model family"
        )
    width = hook_width(model, hook)
    if sae_width is not None and width is not None and width != sae_width:
        raise ValueError(
            f"the SAE reads width {sae_width} at {hook.name!r}, but this {info.family} model's activation there "
            f"has width {width}; load an SAE trained on this model's {hook.name} hook"
        )
    return info


__all__ = [
    "HookPoint",
    "ModelInfo",
    "check_hook",
    "describe",
    "hook_width",
    "model_family",
    "no_hooks_reason",
    "parse_hook",
]
