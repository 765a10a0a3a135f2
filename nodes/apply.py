"""Apply Feature Intervention: a patched clone of MODEL that edits bias features while it samples."""

from __future__ import annotations

from typing import NamedTuple

from comfy_api.latest import io

from ..diffbias_core import SUPPRESS, EditSpec, parse_target
from ..diffbias_core.attribute.features import check_top_k
from .intervention_run import add_intervention
from .model_info import check_hook, parse_hook
from .widgets import seed_input
from .wires import FeaturesType, SaeType, SaeWire

MODES = ("balance", "push", "suppress")
EDITS = ("add", "scale")
STRENGTH_LIMIT = 1000.0


def fixed_class(mode: str, target: str, classes: tuple[str, ...]) -> int | None:
    """The one class of every image (push: a class name, or weights with one positive entry), SUPPRESS, or None."""
    if mode == "suppress":
        return SUPPRESS
    if mode == "balance":
        return None
    if target.strip() in classes:
        return classes.index(target.strip())
    weights = parse_target(target, classes)
    chosen = [i for i, w in enumerate(weights) if w > 0]
    if not target.strip() or len(chosen) != 1:
        raise ValueError(
            f"mode 'push' sends every image to ONE class, but target {target!r} names {len(chosen)} of "
            f"{list(classes)}; write one class name, e.g. {classes[-1]!r}"
        )
    return chosen[0]


class ApplyIntervention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasApplyIntervention",
            display_name="Apply Feature Intervention (DiffBias)",
            category="diffbias/intervene",
            description=(
                "Returns a copy of MODEL that, while sampling, encodes the SAE's hook activation, changes the "
                "bias features of one target class per image and adds back only the decoded change (the SAE's "
                "reconstruction error never enters). Classes are drawn per image from the sampler's seed so "
                "the batch follows the target. Chain one node per attribute (e.g. gender, then race)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch; it stays unchanged."),
                SaeType.Input("sae", tooltip="SAE trained on this model's hook point (Load Bias SAE)."),
                FeaturesType.Input(
                    "features",
                    tooltip="Bias features found on that SAE (Load Bias Features "
                    "or Attribute Bias Features).",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default="balance",
                    tooltip="balance: each image gets a class so the batch follows the target; "
                    "push: every image gets the one class named in target; suppress: the "
                    "features of all classes are removed (target and strength unused).",
                ),
                io.String.Input(
                    "target",
                    default="",
                    tooltip="Target distribution over the feature set's classes: '' = uniform, "
                    "'1,1' in class order, or 'male:0.3,female:0.7'. For push: one class "
                    "name. Weights >= 0, at least one > 0.",
                ),
                io.Combo.Input(
                    "edit",
                    options=list(EDITS),
                    default="add",
                    tooltip="add: z_j += strength at every position (neutral 0); scale: z_j *= "
                    "strength where the feature is active (neutral 1).",
                ),
                io.Float.Input(
                    "strength",
                    default=10.0,
                    min=-STRENGTH_LIMIT,
                    max=STRENGTH_LIMIT,
                    step=0.1,
                    tooltip="Edit strength: add -1000..1000 (neutral 0), scale 0..1000 (neutral 1). "
                    "A neutral value returns the model unchanged.",
                ),
                io.Int.Input(
                    "top_k",
                    default=10,
                    min=0,
                    max=1000,
                    tooltip="Features edited per class, best first (0-1000; 0 = no edit).",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the schedule where the edit starts (0 = first step).",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the schedule where the edit stops (1 = last step).",
                ),
                io.Boolean.Input(
                    "cond_only",
                    default=True,
                    tooltip="Edit only the conditional (positive) half of a CFG batch, as "
                    "DiffLens does; the unconditional prediction stays exact.",
                ),
                seed_input(
                    "Mixed with the sampler's seed to draw each image's class: the same "
                    "sampler seed reproduces the image, a new one redraws the classes."
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The patched copy of MODEL (MODEL itself when the edit is neutral)."),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        sae: SaeWire,
        features,
        mode: str,
        target: str,
        edit: str,
        strength: float,
        top_k: int,
        start_percent: float,
        end_percent: float,
        cond_only: bool,
        seed: int,
    ) -> io.NodeOutput:
        settings = InterventionSettings(
            mode, target, edit, strength, top_k, start_percent, end_percent, cond_only, seed
        )
        return io.NodeOutput(intervention_model(model, sae, features, settings))


class InterventionSettings(NamedTuple):
    """The widgets of Apply Feature Intervention (see its tooltips), in its input order."""

    mode: str
    target: str
    edit: str
    strength: float
    top_k: int
    start_percent: float
    end_percent: float
    cond_only: bool
    seed: int


def intervention_model(model, sae: SaeWire, features, settings: InterventionSettings):
    """The patched clone of ``model`` that Apply Feature Intervention returns (``model`` itself when the edit
    is neutral); ValueError on settings that do not fit the SAE, features or model."""
    mode, target, edit, strength = settings.mode, settings.target, settings.edit, settings.strength
    start_percent, end_percent = settings.start_percent, settings.end_percent
    if mode not in MODES or edit not in EDITS:
        raise ValueError(f"mode must be one of {MODES} and edit one of {EDITS}, got {mode!r} and {edit!r}")
    if edit == "scale" and mode != "suppress" and not 0.0 <= strength <= STRENGTH_LIMIT:
        raise ValueError(
            f"strength {strength} is out of range for 'scale': use 0..{STRENGTH_LIMIT:g} "
            "(1 = unchanged, 0 = remove the feature, 2 = double it)"
        )
    if start_percent > end_percent:
        raise ValueError(
            f"start_percent {start_percent} is after end_percent {end_percent}: the edit "
            "window would be empty; make start_percent <= end_percent"
        )
    info = sae.handle  # facts from the header; the decoder is verified once by its fingerprint
    features.check_matches(info)
    check_top_k(features, settings.top_k)
    hook = parse_hook(info.hook)
    check_hook(model, hook, info.d_in, info.model_family)
    if not hook.is_unet and info.kernel_size != 1:
        raise ValueError(
            f"a {info.kernel_size}x{info.kernel_size}-kernel SAE codes spatial maps; "
            f"DiT hook {hook.name!r} needs a per-token SAE (kernel 1)"
        )
    weights = parse_target(target, features.classes) if mode == "balance" else (1.0,) * features.num_classes
    fixed = fixed_class(mode, target, features.classes)
    spec = (
        EditSpec(mode="ablate", top_k=settings.top_k)
        if mode == "suppress"
        else EditSpec(mode=edit, strength=float(strength), top_k=settings.top_k)
    )
    if spec.is_identity:
        return model
    return add_intervention(
        model,
        hook,
        info,
        features,
        spec,
        weights=weights,
        fixed=fixed,
        seed=settings.seed,
        window=(start_percent, end_percent),
        cond_only=settings.cond_only,
    )
