"""Helpers for tests that run inside a ComfyUI process (see conftest.py of this folder).

Every ComfyUI import is inside a function: the parent pytest session imports the test modules (to
collect them) without ComfyUI, so a test module may import this one at its top, but must not import
``comfy``, ``nodes`` or ``folder_paths`` there.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch

from ..comfy_server import REPO
from ..make_checkpoint import randomize_

CPU = torch.device("cpu")


class Plugin(NamedTuple):
    """The plugin as ComfyUI's own loader (``nodes.load_custom_node``) imported it."""

    package: ModuleType
    """The plugin package (its ``__name__`` is the plugin folder's path, as ComfyUI names it)."""
    core: ModuleType
    """The plugin's own copy of the core: ``<package>.diffbias_core``, the one its nodes call."""
    node_classes: dict[str, type]
    """DiffBias node id -> node class, as registered in ComfyUI's ``NODE_CLASS_MAPPINGS``."""

    def __repr__(self) -> str:
        return f"Plugin({self.package.__name__!r})"

    def module(self, dotted: str) -> ModuleType:
        """A submodule of the loaded plugin, e.g. ``plugin.module("nodes.patching")``."""
        return sys.modules[f"{self.package.__name__}.{dotted}"]


def load_plugin(folder: Path = REPO) -> Plugin:
    """Load the plugin folder with ``nodes.load_custom_node`` (raises if ComfyUI refuses it)."""
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(folder))):
        raise RuntimeError(f"ComfyUI's loader did not load the plugin at {folder} (see the log above)")
    package = sys.modules[str(folder).replace(".", "_x_")]
    classes = {key: cls for key, cls in nodes.NODE_CLASS_MAPPINGS.items() if key.startswith("DiffBias")}
    return Plugin(package, sys.modules[f"{package.__name__}.diffbias_core"], classes)


def patcher(base_model) -> Any:
    """A CPU ``comfy.model_patcher.ModelPatcher`` around a ``comfy.model_base.BaseModel``."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(base_model, load_device=CPU, offload_device=CPU)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights (make_checkpoint's scheme: N(0, 1/fan_in) matrices, unit scales, zero biases)."""
    randomize_(module, torch.Generator().manual_seed(seed))


def random_conds(
    tokens: int = 77, dim: int = 768, seed: int = 5, pooled: int | None = None, **extras
) -> tuple[list, list]:
    """Seeded random (positive, negative) conditioning, each ``[[tensor (1, tokens, dim), {extras}]]``.

    pooled: width of a ``pooled_output`` (1, pooled) entry (Flux's vec, SDXL's pooled CLIP-G), or None.
    """
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        extra = dict(extras)
        if pooled:
            extra["pooled_output"] = torch.randn(1, pooled, generator=generator)
        out.append([[torch.randn(1, tokens, dim, generator=generator), extra]])
    return out[0], out[1]


def sample(
    model,
    positive: list,
    negative: list,
    latent: torch.Tensor,
    *,
    steps: int = 2,
    cfg: float = 5.0,
    seed: int = 7,
    sampler_name: str = "euler",
    scheduler: str = "normal",
) -> torch.Tensor:
    """Sample ``model`` through ComfyUI's sampler (``comfy.sample.sample``, what KSampler calls).

    latent: the starting latent, e.g. zeros (batch, channels, h, w) or (batch, channels, t, h, w).
    Returns the sampled latent, same shape. The noise comes from ``seed`` (KSampler's noise).
    """
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent,
        disable_pbar=True,
        seed=seed,
    )


def first_step_predictions(
    model, positive: list, negative: list, latent: torch.Tensor, **sample_options
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) denoised predictions of the first sampler step (the input is the same for any model)."""
    seen: dict[str, torch.Tensor] = {}

    def post_cfg(args):
        seen.setdefault("cond", args["cond_denoised"].clone())
        seen.setdefault("uncond", args["uncond_denoised"].clone())
        return args["denoised"]

    clone = model.clone()
    clone.set_model_sampler_post_cfg_function(post_cfg)
    sample(clone, positive, negative, latent, **{"steps": 1, **sample_options})
    return seen["cond"], seen["uncond"]


def dit_block_inputs(
    model, kind: str, index: int, positive: list, negative: list, latent: torch.Tensor, **sample_options
) -> dict[str, torch.Tensor]:
    """The tensors (``img``, and ``txt`` for a double block) that DiT block ``(kind, index)`` receives at its
    first call while ``model`` samples one step (cfg 1 unless given). kind: "double_block" | "single_block".
    """
    seen: dict[str, torch.Tensor] = {}

    def observer(args, extra):
        for name in ("img", "txt"):
            if isinstance(args.get(name), torch.Tensor):
                seen.setdefault(name, args[name].clone())
        return extra["original_block"](args)

    watched = model.clone()
    watched.set_model_patch_replace(observer, "dit", kind, index)
    sample(watched, positive, negative, latent, **{"steps": 1, "cfg": 1.0, **sample_options})
    if not seen:
        raise AssertionError(f"the model never called ('dit', {kind!r}, {index}): no such block patch point")
    return seen


def make_sae(
    core: ModuleType, width: int, hook: str, family: str, latents: int = 96, k: int = 8, seed: int = 0
):
    """A seeded random per-token ``SparseAutoencoder`` of the plugin's core for a ``width``-channel hook."""
    sae = core.SparseAutoencoder(width, latents, k, hook=hook, model_family=family)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def make_features(
    core: ModuleType, sae, classes: Sequence[str] = ("male", "female"), per_class: int = 6, seed: int = 3
):
    """A ``FeatureSet`` of the plugin's core on ``sae``: distinct random ids per class, descending scores."""
    ids = torch.randperm(sae.num_latents, generator=torch.Generator().manual_seed(seed))
    ids = ids[: per_class * len(classes)].reshape(len(classes), per_class)  # (classes, per_class)
    return core.FeatureSet(
        classes=tuple(classes),
        ids=tuple(row.clone() for row in ids),
        scores=tuple(torch.linspace(1, 0.5, per_class) for _ in classes),
        sae_fingerprint=sae.fingerprint(),
        hook=sae.hook,
        method="random",
    )


APPLY_DEFAULTS = dict(
    mode="balance",
    target="",
    edit="add",
    strength=8.0,
    top_k=6,
    start_percent=0.0,
    end_percent=1.0,
    cond_only=True,
    seed=0,
)
"""Widget values for Apply Feature Intervention that the tests start from (a visible edit)."""


def apply_intervention(plugin: Plugin, model, sae, features, **widgets):
    """Run the Apply Feature Intervention node (``execute``, as ComfyUI does); returns its MODEL output."""
    wire = plugin.module("nodes.wires").SaeWire(sae, "/dev/null")
    node = plugin.node_classes["DiffBiasApplyIntervention"]
    return node.execute(model, wire, features, **{**APPLY_DEFAULTS, **widgets}).args[0]


def tiny_model(config_class: str, unet_config: dict, seed: int):
    """A CPU ModelPatcher of ``comfy.supported_models.<config_class>`` built from ``unet_config`` (the dict
    ComfyUI's model detection would produce, with small widths), float32 and seeded random weights."""
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, config_class)({"dtype": torch.float32, **unet_config})
    base = model_config.get_model({})
    randomize(base.diffusion_model, seed)
    return patcher(base)


TINY_UNET_HOOK, TINY_UNET_FAMILY, TINY_UNET_WIDTH = "unet.middle", "sd15", 64
"""Where :func:`tiny_unet` is edited: its bottleneck, 64 channels."""


def tiny_latent(batch: int = 2) -> torch.Tensor:
    """An empty latent of :func:`tiny_unet`: (batch, 4 latent channels, 32 px / 8, 32 px / 8)."""
    return torch.zeros(batch, 4, 4, 4)


def tiny_unet(seed: int = 0, context_dim: int = 768):
    """ComfyUI's SD15 model class with a tiny UNet (32 channels, 2 levels; 64-channel bottleneck)."""
    from ..make_checkpoint import sd15_unet_config

    config = sd15_unet_config(torch.float32, model_channels=32)
    config.update(
        num_res_blocks=[1, 1],
        transformer_depth=[1, 1],
        channel_mult=[1, 2],
        num_heads=2,
        transformer_depth_output=[1, 1, 1, 1],
        context_dim=context_dim,
    )
    return tiny_model("SD15", config, seed)


def tiny_flux(seed: int = 1):
    """ComfyUI's Flux model class: width 64, two double and two single blocks, context 48, vec 32."""
    config = {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "vec_in_dim": 32,
        "context_in_dim": 48,
        "hidden_size": 64,
        "mlp_ratio": 2.0,
        "num_heads": 2,
        "depth": 2,
        "depth_single_blocks": 2,
        "axes_dim": [8, 12, 12],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": False,
    }
    return tiny_model("Flux", config, seed)


def run_classes(plugin: Plugin, model, positive, negative, latent, seed: int) -> dict[str, list[int]]:
    """Per intervention key, the class each image of the batch was assigned in one sampler run (1 step)."""
    patching = plugin.module("nodes.patching")
    run = plugin.module("nodes.intervention_run")
    seen: dict[str, list[int]] = {}

    def post_cfg(args):
        for key, value in args["model_options"]["transformer_options"].items():
            if key.startswith(patching.INTERVENTION_KEY) and isinstance(value, run.RunState):
                seen.setdefault(key, value.image_class.tolist())
        return args["denoised"]

    clone = model.clone()
    clone.set_model_sampler_post_cfg_function(post_cfg)
    sample(clone, positive, negative, latent, steps=1, seed=seed)
    return seen


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-identical, or an AssertionError naming ``what`` with the count and size of the differences."""
    __tracebackhide__ = True
    torch.testing.assert_close(
        actual, expected, rtol=0, atol=0, msg=lambda m: f"{what} is not bit-identical: {m}"
    )


def assert_differs(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Not equal anywhere would mean the edit is invisible: an AssertionError naming ``what``."""
    __tracebackhide__ = True
    if torch.equal(actual, expected):
        raise AssertionError(
            f"{what}: identical to the unedited run (shape {tuple(actual.shape)}): the edit changed nothing"
        )
