"""Attribute Bias Features: sample paired class prompts, fit per-step probes, rank the SAE features per class."""

from __future__ import annotations

import dataclasses
import logging

import comfy.model_management
import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample
from comfy_api.latest import io, ui

from ..diffbias_core import SparseAutoencoder
from ..diffbias_core.attribute.attribution import AttributionConfig, attribute
from ..diffbias_core.attribute.probes import ProbeConfig, fit_probes
from ..diffbias_core.base.memory import activation_bytes, check_fits, format_bytes
from ..diffbias_core.base.progress import Cancelled
from ..diffbias_core.dissect.activations import ActivationBatch, MemorySource, concat_batches, make_batch
from ..diffbias_core.sae.lazy import SaeHandle
from .charts import feature_chart, features_report
from .model_info import check_hook, parse_hook
from .recorder import Captured, add_recorder
from .runs import plan_runs
from .sampling import RunSettings, empty_latent, encode, sample
from .sampling import class_prompts as parse_class_prompts
from .widgets import negative_prompt_input, sampler_inputs, size_inputs
from .wires import FeaturesType, SaeType, SaeWire

logger = logging.getLogger(__name__)
METHODS = {"integrated gradients": "ig", "mean difference": "mean-diff"}
"""Widget value -> ``AttributionConfig.method``."""


def as_map(activations: torch.Tensor) -> torch.Tensor:
    """UNet maps (n, C, H, W) as they are; DiT tokens (n, T, C) as (n, C, T, 1) maps (one position per token)."""
    if activations.ndim == 4:
        return activations
    return activations.permute(0, 2, 1).unsqueeze(-1)  # (n, T, C) -> (n, C, T, 1)


def check_map_size(model, sae: SparseAutoencoder | SaeHandle, point, width: int, height: int) -> None:
    """Before sampling: a K x K-kernel SAE at the UNet bottleneck needs a K x K map at this image size."""
    if sae.kernel_size == 1 or point.name != "unet.middle":
        return
    net = model.get_model_object("diffusion_model")
    halvings = sum(isinstance(m, Downsample) for m in net.input_blocks.modules())
    size = [height // 8, width // 8]  # the latent (empty_latent)
    for _ in range(halvings):
        size = [-(-n // 2) for n in size]  # a stride-2 convolution with padding 1: ceil(n / 2)
    if size != [sae.kernel_size, sae.kernel_size]:
        scale = 8 * 2**halvings
        raise ValueError(
            f"this SAE has a {sae.kernel_size}x{sae.kernel_size} kernel and codes the whole bottleneck map, but "
            f"at {width}x{height} the map is {size[1]}x{size[0]}; set width and height to "
            f"{sae.kernel_size * scale} (the size it was trained for) or use a per-token SAE"
        )


class AttributeFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasAttributeFeatures",
            display_name="Attribute Bias Features (DiffBias)",
            category="diffbias/features",
            description=(
                "Samples every class prompt from the same initial noise (paired), records the SAE's hook "
                "activation at every step, fits a linear probe per step that tells the classes apart, and ranks "
                "the SAE features that carry each class (integrated gradients through the probes, or the "
                "difference of mean activations). Stops with an error when the probes are at chance at "
                "every step (the prompts do not separate the classes at this hook)."
            ),
            not_idempotent=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the SAE was trained on."),
                io.Clip.Input("clip", tooltip="Its text encoder."),
                SaeType.Input(
                    "sae",
                    tooltip="The SAE whose features are ranked (its hook is where activations are recorded).",
                ),
                io.String.Input(
                    "class_prompts",
                    multiline=True,
                    default="a photo of a male person\na photo of a female person",
                    tooltip="One prompt per class, one per line (at least 2). Class names are the words "
                    "that differ, or write 'name: prompt'.",
                ),
                negative_prompt_input(),
                *size_inputs(),
                io.Int.Input(
                    "samples",
                    default=32,
                    min=2,
                    max=10000,
                    tooltip="Images per class (>= 2); sample j of every class shares its noise.",
                ),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Images per sampler run."),
                *sampler_inputs(
                    cfg_tooltip="Classifier-free guidance scale.",
                    seed_tooltip="Noise seed: run j of every class uses seed + j (paired noise).",
                ),
                io.Combo.Input(
                    "method",
                    options=list(METHODS),
                    default="integrated gradients",
                    tooltip="integrated gradients: attribution through the per-step probes (DiffLens); "
                    "mean difference: fast ranking by the difference of mean activations.",
                ),
                io.Int.Input(
                    "top_k", default=30, min=1, max=10000, tooltip="Features kept per class, best first."
                ),
            ],
            outputs=[
                FeaturesType.Output(
                    "features",
                    display_name="features",
                    tooltip="Ranked bias features per class, tied to this SAE.",
                ),
                io.Image.Output(
                    "chart",
                    display_name="chart",
                    tooltip="Bar chart of the top features' scores per class and the probes' "
                    "accuracy per step.",
                ),
                io.String.Output(
                    "probe_accuracy",
                    display_name="probe_accuracy",
                    tooltip="Held-out accuracy of the probe at every sampling step (chance = 1 / classes).",
                ),
                io.String.Output(
                    "report",
                    display_name="report",
                    tooltip="The probe test (how many steps beat chance), accuracy per step and warnings "
                    "about the top features (no score, listed under several classes); wire it to "
                    "Preview Any. Probes at chance at every step stop the node with an error instead.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        sae: SaeWire,
        class_prompts: str,
        negative_prompt: str,
        width: int,
        height: int,
        samples: int,
        batch_size: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        seed: int,
        method: str,
        top_k: int,
    ) -> io.NodeOutput:
        names, prompts = parse_class_prompts(class_prompts)
        info = sae.handle  # the header's facts: checks before the whole SAE is read (by attribute below)
        point = parse_hook(info.hook)
        check_hook(model, point, info.d_in, info.model_family)
        check_map_size(model, info, point, width, height)
        runs = plan_runs(len(prompts), [samples] * len(prompts), batch_size, seed, paired=True)
        sampled = len(runs) * steps  # progress: sampling, then probes and ranking (steps units each)
        progress = comfy.utils.ProgressBar(sampled + 2 * steps)
        parts: list[ActivationBatch] = []
        current = {}
        memory: dict[str, int] = {}

        def sink(captured: Captured) -> None:
            if not parts:  # the first activation: say what all of them will need, refuse what cannot fit
                need = activation_bytes(len(prompts) * samples, steps, tuple(captured.activations.shape[1:]))
                memory["need"] = need
                logger.info("Attribute Bias Features keeps %d activations of shape %s: %s (up to twice that while "
                            "they are joined)", len(prompts) * samples * steps, tuple(captured.activations.shape[1:]),
                            format_bytes(need))  # fmt: skip
                check_fits(2 * need, f"keeping the activations of {len(prompts) * samples} images x {steps} steps")
            run = current["run"]
            parts.append(
                make_batch(
                    as_map(captured.activations).float().cpu(),
                    captured.step,
                    label=run.prompt,
                    sample=captured.image + run.first,
                    timestep=captured.sigma,
                )
            )

        recording = add_recorder(model, point, sink)
        negative = encode(clip, negative_prompt)
        settings = RunSettings(steps, cfg, sampler_name, scheduler)
        for run in runs:
            current["run"] = run
            latent = empty_latent(model, run.batch, width, height)
            sample(
                recording, encode(clip, prompts[run.prompt]), negative, latent, run.seed, settings, progress
            )
        facts = {
            "prompts": " | ".join(prompts),
            "negative_prompt": negative_prompt,
            "samples": str(samples),
            "sampling_steps": str(steps),
            "cfg": str(cfg),
            "sampler": f"{sampler_name}/{scheduler}",
            "seed": str(seed),
            "size": f"{width}x{height}",
        }
        def phase(offset: int):
            return lambda done, total: progress.update_absolute(offset + done * steps // max(total, 1))

        stop = comfy.model_management.processing_interrupted  # Cancel, polled inside the fits and IG
        try:
            # the core leaves inference mode where it fits probes and runs IG (base/grad_mode.trainable)
            source = MemorySource(concat_batches(parts), hook=point.name, classes=names)
            probes = fit_probes(source, ProbeConfig(seed=seed % 2**31), progress=phase(sampled),
                                should_stop=stop)  # fmt: skip
            config = AttributionConfig(method=METHODS[method], top_k=top_k)
            features = attribute(sae.sae, source, config, probes, progress=phase(sampled + steps),
                                 should_stop=stop)  # fmt: skip
        except Cancelled:
            raise comfy.model_management.InterruptProcessingException() from None
        features = dataclasses.replace(features, provenance={**features.provenance, **facts})
        progress.update_absolute(sampled + 2 * steps)
        accuracy = [float(a) for a in probes.accuracy]
        text = ", ".join(f"{int(s)}: {a:.2f}" for s, a in zip(probes.steps.tolist(), accuracy, strict=True))
        text += f" (activations kept: {format_bytes(memory.get('need', 0))})"
        report, warnings = features_report(features, top_k)
        chart = feature_chart(features, top_k=min(top_k, 20), accuracy=[a for a in accuracy if a == a],
                              notes=warnings)  # fmt: skip
        return io.NodeOutput(features, chart, text, report, ui=ui.PreviewImage(chart, cls=cls))
