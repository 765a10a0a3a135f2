"""Widgets shared by several nodes: the sampling ones (Train Bias SAE, Attribute Bias Features, Train Bias
Classifier, Calibrate Intervention), the intervention's (Apply Feature Intervention, Calibrate Intervention), seeds.

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


def sampling_inputs(*, cfg_tooltip: str) -> list:
    """``steps``, ``cfg``, ``sampler_name``, ``scheduler``, as in KSampler."""
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
    ]


def sampler_inputs(*, cfg_tooltip: str, seed_tooltip: str) -> list:
    """``steps``, ``cfg``, ``sampler_name``, ``scheduler``, ``seed``, as in KSampler."""
    return [*sampling_inputs(cfg_tooltip=cfg_tooltip), seed_input(seed_tooltip)]


def seed_input(tooltip: str, name: str = "seed", default: int = 0) -> io.Int.Input:
    """A 64-bit seed widget (0 .. 2**64 - 1), left as set after each run."""
    return io.Int.Input(
        name, default=default, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False, tooltip=tooltip
    )


# ------------------------------------------------------------------ the intervention's widgets
MODES = ("balance", "push", "suppress")
"""How Apply Feature Intervention gives the images their classes."""
EDITS = ("add", "scale")
"""What the edit does to a selected latent."""
STRENGTH_LIMIT = 1000.0
"""Largest magnitude of an edit strength."""
INTERVENTION_TOOLTIPS = {
    "mode": "balance: each image gets a class so the batch follows the target; push: every image gets the one "
    "class named in target; suppress: the features of all classes are removed (target and strength unused).",
    "target": "Target distribution over the feature set's classes: '' = uniform, '1,1' in class order, or "
    "'male:0.3,female:0.7'. For push: one class name. Weights >= 0, at least one > 0.",
    "edit": "add: z_j += strength at every position (neutral 0); scale: z_j *= strength where the feature is "
    "active (neutral 1).",
    "strength": "Edit strength: add -1000..1000 (neutral 0), scale 0..1000 (neutral 1). A neutral value returns "
    "the model unchanged.",
    "top_k": "Features edited per class, best first (0-1000; 0 = no edit).",
    "start_percent": "Fraction of the schedule where the edit starts (0 = first step).",
    "end_percent": "Fraction of the schedule where the edit stops (1 = last step).",
    "cond_only": "Edit only the conditional (positive) half of a CFG batch, as DiffLens does; the unconditional "
    "prediction stays exact.",
    "seed": "Mixed with the sampler's seed to draw each image's class: the same sampler seed reproduces the "
    "image, a new one redraws the classes.",
}
"""Apply Feature Intervention's tooltips, by input name."""


def intervention_inputs(
    *,
    modes: tuple[str, ...] = MODES,
    strength: bool = True,
    top_k_min: int = 0,
    target: io.String.Input | None = None,
    tooltips: dict[str, str] | None = None,
) -> list:
    """Apply Feature Intervention's widgets, in its order: ``mode``, ``target``, ``edit``, ``strength``,
    ``top_k``, ``start_percent``, ``end_percent``, ``cond_only``, ``seed``.

    A node that takes the same settings (Calibrate Intervention) narrows ``modes``, leaves ``strength`` out,
    raises ``top_k_min``, gives its own ``target`` widget and replaces some ``tooltips`` (by input name).
    """
    tip = {**INTERVENTION_TOOLTIPS, **(tooltips or {})}
    inputs = [
        io.Combo.Input("mode", options=list(modes), default="balance", tooltip=tip["mode"]),
        target or io.String.Input("target", default="", tooltip=tip["target"]),
        io.Combo.Input("edit", options=list(EDITS), default="add", tooltip=tip["edit"]),
    ]
    if strength:
        inputs.append(io.Float.Input("strength", default=10.0, min=-STRENGTH_LIMIT, max=STRENGTH_LIMIT, step=0.1,
                                     tooltip=tip["strength"]))  # fmt: skip
    return [
        *inputs,
        io.Int.Input("top_k", default=10, min=top_k_min, max=1000, tooltip=tip["top_k"]),
        io.Float.Input(
            "start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=tip["start_percent"]
        ),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=tip["end_percent"]),
        io.Boolean.Input("cond_only", default=True, tooltip=tip["cond_only"]),
        seed_input(tip["seed"]),
    ]
