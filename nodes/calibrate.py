"""Calibrate Intervention: search the edit strength that brings a calibration batch to the target."""

from __future__ import annotations

import comfy.utils
from comfy_api.latest import io

from ..diffbias_core.intervene.intervention import parse_target
from ..diffbias_core.measure import CalibrationConfig, calibrate, measure_images
from ..diffbias_core.measure.classifier import check_classifier
from .apply import InterventionSettings, fixed_class, intervention_model
from .measure import target_input
from .measure_chart import calibration_chart
from .sampling import RunSettings, decode, empty_latent, sample
from .widgets import EDITS, STRENGTH_LIMIT, intervention_inputs, sampling_inputs, seed_input, size_inputs
from .wires import ClassifierType, FeaturesType, SaeType

MODES = ("balance", "push")
NEUTRAL = {"add": 0.0, "scale": 1.0}
TOOLTIPS = {
    "mode": "As in Apply Feature Intervention: balance (the batch follows the target) or push (every image to "
    "the one class named in target).",
    "edit": "add (search from 0) or scale (search from 1), as in Apply.",
    "top_k": "Features edited per class, as in Apply (1-1000).",
    "seed": "As Apply's seed (mixed with the sampler's seed to draw each image's class).",
}
"""Where Calibrate's intervention widgets differ from Apply's (it searches the strength, it has no suppress)."""


def measurement_target(mode: str, target: str, feature_classes, classifier_classes) -> tuple[float, ...]:
    """The intervention's target (over the feature set's classes) as shares of the classifier's classes."""
    if set(feature_classes) != set(classifier_classes):
        raise ValueError(
            f"the classifier's classes {list(classifier_classes)} are not the feature set's classes "
            f"{list(feature_classes)}: train the classifier from the same class names (e.g. the same class prompts)"
        )
    if mode == "push":
        weights = [0.0] * len(feature_classes)
        weights[fixed_class(mode, target, tuple(feature_classes))] = 1.0
    else:
        weights = list(parse_target(target, feature_classes))
    return tuple(weights[list(feature_classes).index(name)] for name in classifier_classes)


class CalibrateIntervention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasCalibrateIntervention",
            display_name="Calibrate Intervention (DiffBias)",
            category="diffbias/measure",
            description=(
                "Finds the edit strength instead of guessing it: samples a calibration batch (the same seed "
                "every time) with the intervention at trial strengths, classifies the images, and searches the "
                "weakest strength whose FD is within the tolerance (bracketing, then bisection; a golden-section "
                "search for the smallest FD when the tolerance is out of reach), in as few sampler runs as it "
                "can. Wire 'strength' into Apply Feature Intervention's strength (same settings)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (unpatched); it is not changed."),
                SaeType.Input("sae", tooltip="The SAE of the intervention."),
                FeaturesType.Input("features", tooltip="The bias features of the intervention."),
                ClassifierType.Input(
                    "classifier",
                    tooltip="Classifier of the attribute; never the edited hook. "
                    "Its classes must be the feature set's.",
                ),  # fmt: skip
                io.Vae.Input("vae", tooltip="The VAE, to decode the calibration images for the classifier."),
                io.Conditioning.Input(
                    "positive", tooltip="The prompt of the images to balance (CLIP Text Encode)."
                ),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                *intervention_inputs(
                    modes=MODES,
                    strength=False,
                    top_k_min=1,
                    target=target_input(),
                    tooltips=TOOLTIPS,
                ),
                *size_inputs(),
                io.Int.Input(
                    "batch_size",
                    default=8,
                    min=2,
                    max=256,
                    tooltip="Calibration images per sampler run (one run per trial); more images give a "
                    "steadier FD, each run costs one batch.",
                ),  # fmt: skip
                *sampling_inputs(cfg_tooltip="Guidance, as in your KSampler."),
                seed_input(
                    "Seed of the calibration batch (the same for every trial). Use other seeds for the final "
                    "images, so the strength is checked on images it was not fitted to.",
                    name="noise_seed",
                    default=1000,
                ),
                io.Float.Input(
                    "max_strength",
                    default=20.0,
                    min=-STRENGTH_LIMIT,
                    max=STRENGTH_LIMIT,
                    step=0.1,
                    tooltip="The far end of the search (from 0 for add, 1 for scale); negative for add "
                    "searches negative strengths.",
                ),  # fmt: skip
                io.Float.Input(
                    "tolerance",
                    default=0.01,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="FD accepted as on target (0-1); the weakest strength within it is chosen.",
                ),  # fmt: skip
                io.Int.Input(
                    "max_runs",
                    default=12,
                    min=2,
                    max=100,
                    tooltip="Sampler runs at most (the run without an edit included).",
                ),  # fmt: skip
            ],
            outputs=[
                io.Float.Output(
                    "strength",
                    display_name="strength",
                    tooltip="The calibrated strength: wire it into Apply Feature Intervention's strength.",
                ),  # fmt: skip
                io.Float.Output(
                    "fd", display_name="fd", tooltip="FD of the calibration batch at that strength."
                ),
                io.String.Output(
                    "report",
                    display_name="report",
                    tooltip="Every trial (strength, FD) and why the search stopped; wire it to Preview Any.",
                ),  # fmt: skip
                io.Image.Output(
                    "chart", display_name="chart", tooltip="FD of every trial against its strength."
                ),
            ],
        )

    @classmethod
    def execute(cls, model, sae, features, classifier, vae, positive, negative, mode: str, target: str, edit: str,
                top_k: int, start_percent: float, end_percent: float, cond_only: bool, seed: int, width: int,
                height: int, batch_size: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                noise_seed: int, max_strength: float, tolerance: float, max_runs: int) -> io.NodeOutput:  # fmt: skip
        if mode not in MODES or edit not in EDITS:
            raise ValueError(
                f"mode must be one of {MODES} and edit one of {EDITS}, got {mode!r} and {edit!r}"
            )
        check_classifier(classifier)
        goal = measurement_target(mode, target, features.classes, classifier.classes)
        config = CalibrationConfig(
            start=NEUTRAL[edit], end=max_strength, tolerance=tolerance, max_runs=max_runs
        )
        base = InterventionSettings(
            mode, target, edit, config.end, top_k, start_percent, end_percent, cond_only, seed
        )
        intervention_model(model, sae, features, base)  # every check of Apply, before the first run
        latent = empty_latent(model, batch_size, width, height)
        settings = RunSettings(steps, cfg, sampler_name, scheduler)
        progress = comfy.utils.ProgressBar(max_runs * steps)

        def evaluate(strength: float):
            patched = intervention_model(model, sae, features, base._replace(strength=strength))
            images = decode(vae, sample(patched, positive, negative, latent, noise_seed, settings, progress))
            return measure_images(classifier, images, goal)

        result = calibrate(evaluate, config)
        progress.update_absolute(max_runs * steps)
        lines = [f"strength {result.strength:.6g}: FD {result.fd:.4f} on the calibration batch "
                 f"({'on target' if result.on_target else 'target not reached'}; {result.reason}); "
                 f"{len(result.trials)} sampler runs of {batch_size} images"]  # fmt: skip
        lines += [f"  run {i + 1} ({t.phase}): strength {t.strength:.6g} -> FD {t.fd:.4f}, hard "
                  f"{t.report.hard_fd:.4f}, {t.report.unreadable} unreadable" for i, t in enumerate(result.trials)]  # fmt: skip
        lines.append("Wire 'strength' into Apply Feature Intervention (same sae, features, mode, target, edit, top_k, "
                     "window, cond_only and seed) and check the result on fresh seeds with Measure Bias.")  # fmt: skip
        return io.NodeOutput(
            result.strength, result.fd, "\n".join(lines), calibration_chart(result, tolerance)
        )


__all__ = ["CalibrateIntervention", "measurement_target"]
