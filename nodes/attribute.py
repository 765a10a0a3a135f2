"""Attribute Bias Features: sample paired class prompts, fit per-step probes, rank the SAE features per class."""

from __future__ import annotations

import dataclasses
import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample
from comfy_api.latest import io, ui

from ..diffbias_core import SparseAutoencoder
from ..diffbias_core.attribute.attribution import AttributionConfig, attribute
from ..diffbias_core.attribute.budget import AttributionMemory, attribution_memory, check_attribution_fits
from ..diffbias_core.attribute.probes import ProbeConfig, fit_probes
from ..diffbias_core.base.layout import to_map
from ..diffbias_core.base.progress import Cancelled
from ..diffbias_core.dissect.activations import make_batch
from ..diffbias_core.dissect.spool import ActivationSpool
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


def bottleneck_size(model, width: int, height: int) -> tuple[list[int], int]:
    """([h, w] of the UNet bottleneck map at this image size, the UNet's number of halvings)."""
    net = model.get_model_object("diffusion_model")
    halvings = sum(isinstance(m, Downsample) for m in net.input_blocks.modules())
    size = [height // 8, width // 8]  # the latent (empty_latent)
    for _ in range(halvings):
        size = [-(-n // 2) for n in size]  # a stride-2 convolution with padding 1: ceil(n / 2)
    return size, halvings


def check_map_size(model, sae: SparseAutoencoder | SaeHandle, point, width: int, height: int) -> None:
    """Before sampling: a K x K-kernel SAE at the UNet bottleneck needs a K x K map at this image size."""
    if sae.kernel_size == 1 or point.name != "unet.middle":
        return
    size, halvings = bottleneck_size(model, width, height)
    if size != [sae.kernel_size, sae.kernel_size]:
        scale = 8 * 2**halvings
        raise ValueError(
            f"this SAE has a {sae.kernel_size}x{sae.kernel_size} kernel and codes the whole bottleneck map, but "
            f"at {width}x{height} the map is {size[1]}x{size[0]}; set width and height to "
            f"{sae.kernel_size * scale} (the size it was trained for) or use a per-token SAE"
        )


def expected_shape(
    model, sae: SparseAutoencoder | SaeHandle, point, width: int, height: int
) -> tuple[int, ...] | None:
    """The (C, H, W) activation a hook point records at this image size, where the model tells it before
    sampling (the UNet bottleneck); None where only the first recorded activation tells."""
    if point.name != "unet.middle":
        return None
    size, _ = bottleneck_size(model, width, height)
    return (sae.d_in, *size)


def recorded_itemsize(model) -> int:
    """Bytes per value of the activations the model will record (its compute dtype; float32 at most)."""
    try:
        dtype = model.get_model_object("manual_cast_dtype") or model.model_dtype()
    except AttributeError:  # a model without these: assume float32
        return 4
    return min(4, torch.empty(0, dtype=dtype).element_size())


def spooled(activations: torch.Tensor) -> torch.Tensor:
    """Activations as they are spooled: float16/bfloat16/float32 as recorded, anything else as float32."""
    keep = (torch.float16, torch.bfloat16, torch.float32)
    return activations if activations.dtype in keep else activations.float()


class MemoryBudget:
    """What one Attribute run needs (RAM and temporary disk), planned for an activation shape and dtype and
    checked against the machine; planned again when the recorded activations turn out otherwise."""

    def __init__(self, sae: SparseAutoencoder | SaeHandle, images: int, steps: int, classes: int,
                 configs: tuple[AttributionConfig, ProbeConfig], folder: str) -> None:  # fmt: skip
        self.sae, self.images, self.steps, self.classes = sae, images, steps, classes
        self.configs, self.folder = configs, folder
        self.need: AttributionMemory | None = None
        self._planned: tuple | None = None

    def check(self, row_shape: tuple[int, ...], itemsize: int) -> AttributionMemory:
        """Plan for activations (C, H, W) of ``itemsize`` bytes a value; MemoryError / OSError when they cannot fit."""
        if self._planned != (row_shape, itemsize):
            need = attribution_memory(self.sae, row_shape, images=self.images, steps=self.steps,
                                      classes=self.classes, attribution=self.configs[0], probes=self.configs[1],
                                      recorded_itemsize=itemsize)  # fmt: skip
            logger.info("Attribute Bias Features: %d activations of shape %s: %s", self.images * self.steps,
                        row_shape, need.describe())  # fmt: skip
            check_attribution_fits(
                need, self.folder, f"attributing {self.images} images x {self.steps} steps"
            )
            self.need, self._planned = need, (row_shape, itemsize)
        return self.need


def record_runs(
    model,
    clip,
    point,
    runs,
    prompts: list[str],
    negative_prompt: str,
    size: tuple[int, int],
    settings: RunSettings,
    spool: ActivationSpool,
    budget: MemoryBudget,
    progress,
) -> None:
    """Sample every paired run with a recorder at ``point``; each recorded activation goes to ``spool``
    (checked against ``budget`` before it is written). size: (width, height) of the images."""
    current = {}

    def sink(captured: Captured) -> None:
        acts = spooled(to_map(captured.activations))  # DiT tokens (n, T, C) as (n, C, T, 1)
        budget.check(tuple(acts.shape[1:]), acts.element_size())  # the real shape, dtype: before a write
        run = current["run"]
        spool.add(make_batch(acts, captured.step, label=run.prompt, sample=captured.image + run.first,
                             timestep=captured.sigma))  # fmt: skip

    recording = add_recorder(model, point, sink)
    negative = encode(clip, negative_prompt)
    for run in runs:
        current["run"] = run
        latent = empty_latent(model, run.batch, *size)
        sample(recording, encode(clip, prompts[run.prompt]), negative, latent, run.seed, settings, progress)


def rank_features(sae: SaeWire, source, config: AttributionConfig, probe_config: ProbeConfig, progress,
                  sampled: int, steps: int):  # fmt: skip
    """Fit the per-step probes on ``source`` and rank the features (progress after the ``sampled`` units of
    sampling: ``steps`` units each); ComfyUI's Cancel is polled inside both. Returns (probes, features)."""

    def phase(offset: int):
        return lambda done, total: progress.update_absolute(offset + done * steps // max(total, 1))

    stop = comfy.model_management.processing_interrupted
    try:
        # the core leaves inference mode where it fits probes and runs IG (base/grad_mode.trainable)
        probes = fit_probes(source, probe_config, progress=phase(sampled), should_stop=stop)
        features = attribute(
            sae.sae, source, config, probes, progress=phase(sampled + steps), should_stop=stop
        )
    except Cancelled:
        raise comfy.model_management.InterruptProcessingException() from None
    return probes, features


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
                    tooltip="Held-out accuracy of the probe at every sampling step (chance = 1 / classes), "
                    "then the memory the run needed (RAM at its peak, temporary disk).",
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
        config = AttributionConfig(method=METHODS[method], top_k=top_k)
        probe_config = ProbeConfig(seed=seed % 2**31)
        temp = folder_paths.get_temp_directory()
        os.makedirs(temp, exist_ok=True)
        images = len(prompts) * samples
        budget = MemoryBudget(info, images, steps, len(names), (config, probe_config), temp)
        shape = expected_shape(model, info, point, width, height)
        if shape is not None:  # known before sampling: refuse before the first model call
            budget.check(shape, recorded_itemsize(model))
        settings = RunSettings(steps, cfg, sampler_name, scheduler)
        with ActivationSpool(temp, hook=point.name, classes=names) as spool:  # removed on error, cancel too
            record_runs(model, clip, point, runs, prompts, negative_prompt, (width, height), settings,
                        spool, budget, progress)  # fmt: skip
            probes, features = rank_features(sae, spool.source(torch.float32), config, probe_config,
                                             progress, sampled, steps)  # fmt: skip
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
        features = dataclasses.replace(features, provenance={**features.provenance, **facts})
        progress.update_absolute(sampled + 2 * steps)
        accuracy = [float(a) for a in probes.accuracy]
        text = ", ".join(f"{int(s)}: {a:.2f}" for s, a in zip(probes.steps.tolist(), accuracy, strict=True))
        text += f" (memory: {budget.need.describe()})"
        report, warnings = features_report(features, top_k)
        chart = feature_chart(features, top_k=min(top_k, 20), accuracy=[a for a in accuracy if a == a],
                              notes=warnings)  # fmt: skip
        return io.NodeOutput(features, chart, text, report, ui=ui.PreviewImage(chart, cls=cls))
