"""Widgets shared by several nodes (the sampling ones: Train Bias SAE, Attribute Bias Features; seeds).

The order of the inputs is part of the public API: UI-format workflow files store widget values by
position, so these helpers return the inputs in the order every node has always had them.
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io


def negative_prompt_input() -> io.String.Input:
    """The negative prompt used for every image."""
    return io.String.Input(
        "negative_prompt",
        multiline=True,
        default="",
        tooltip="Negative prompt for every image (may be empty).",
    )


def size_inputs() -> list[io.Int.Input]:
    """``width``, ``height`` in pixels, as in Empty Latent Image."""
    return [
        io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width in pixels."),
        io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height in pixels."),
    ]


def sampler_inputs(*, cfg_tooltip: str, seed_tooltip: str) -> list:
    """``steps``, ``cfg``, ``sampler_name``, ``scheduler``, ``seed``, as in KSampler."""
    return [
        io.Int.Input("steps", default=30, min=1, max=1000, tooltip="Sampling steps per image."),
        io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, tooltip=cfg_tooltip),
        io.Combo.Input(
            "sampler_name",
            options=comfy.samplers.KSampler.SAMPLERS,
            default="euler",
            tooltip="Sampler, as in KSampler.",
        ),
        io.Combo.Input(
            "scheduler",
            options=comfy.samplers.KSampler.SCHEDULERS,
            default="normal",
            tooltip="Scheduler, as in KSampler.",
        ),
        seed_input(seed_tooltip),
    ]


def seed_input(tooltip: str) -> io.Int.Input:
    """A 64-bit ``seed`` widget (0 .. 2**64 - 1), left as set after each run."""
    return io.Int.Input(
        "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False, tooltip=tooltip
    )
