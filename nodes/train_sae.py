"""Train Bias SAE: sample images and train a TopK SAE on one hook point while they are generated."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..diffbias_core import load_sae, save_sae
from ..diffbias_core.base.layout import to_map
from ..diffbias_core.dissect.activations import MemorySource
from ..diffbias_core.dissect.train import config_for_rows, rows_per_activation, train_sae
from ..diffbias_core.dissect.train_check import Reservoir
from . import files
from .model_info import check_hook, parse_hook
from .recorder import Captured, add_recorder
from .runs import plan_runs, spread
from .sampling import RunSettings, empty_latent, encode, prompt_lines, sample
from .widgets import negative_prompt_input, sampler_inputs, size_inputs
from .wires import SaeType, SaeWire, describe_sae

logger = logging.getLogger(__name__)
TRAIN_PROGRESS = 100
"""Progress-bar units of the training after sampling (filled as steps reach min_steps)."""
STORE_VALUES = 1 << 28
"""At most this many activation values (1 GiB in float32) are kept for training; beyond that a uniform
sample of the activations (every one equally likely) is kept, so memory does not grow with the images."""


class TrainSAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasTrainSAE",
            display_name="Train Bias SAE (DiffBias)",
            category="diffbias/sae",
            description=(
                "Generates images from the prompts, records the activation at the hook point while they are "
                "sampled (at most 1 GiB: a uniform sample beyond), and trains a TopK sparse autoencoder on "
                "it: passes over the activations until at least 2000 optimizer steps, then until the FVU "
                "on held-out images stops improving. Saves it to ComfyUI/models/sae; the report gives the "
                "held-out FVU, dead latents and a verdict (trained / under-trained). Cancelling keeps "
                "what was learned so far in a valid file."
            ),
            not_idempotent=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to dissect."),
                io.Clip.Input("clip", tooltip="Its text encoder."),
                io.String.Input(
                    "prompts",
                    multiline=True,
                    default="a photo of a person\na photo of a doctor\na photo of a firefighter",
                    tooltip="Prompts to sample, one per line; images cycle through them.",
                ),
                negative_prompt_input(),
                *size_inputs(),
                *sampler_inputs(
                    cfg_tooltip="Classifier-free guidance scale (1 = no negative pass).",
                    seed_tooltip="Noise seed of the first run (run i uses seed + i); also seeds the SAE.",
                ),
                io.Int.Input(
                    "images",
                    default=64,
                    min=1,
                    max=100000,
                    tooltip="Number of images to sample in all (more images, better SAE).",
                ),
                io.Int.Input(
                    "batch_size",
                    default=4,
                    min=1,
                    max=256,
                    tooltip="Images per sampler run (memory vs speed).",
                ),
                io.String.Input(
                    "hook",
                    default="unet.middle",
                    tooltip="Hook point: unet.middle (h-space), unet.input.N, unet.output.N, "
                    "dit.double.N, dit.single.N.",
                ),
                io.Int.Input(
                    "latents",
                    default=5120,
                    min=16,
                    max=1048576,
                    tooltip="SAE dictionary size (e.g. 4x the width: 5120 for 1280 channels).",
                ),
                io.Int.Input(
                    "k", default=32, min=1, max=4096, tooltip="Active latents per code (TopK), <= latents."
                ),
                io.String.Input(
                    "file_name",
                    default="my_sae",
                    tooltip="File name in ComfyUI/models/sae ('.safetensors' appended); an existing "
                    "file of that name is replaced.",
                ),
            ],
            outputs=[
                SaeType.Output(
                    "sae",
                    display_name="sae",
                    tooltip="The trained SAE (best weights), also saved to models/sae.",
                ),
                io.String.Output(
                    "report",
                    display_name="report",
                    tooltip="Training report: held-out FVU (0 = perfect reconstruction, 1 = no better "
                    "than the mean), dead latents, steps and the verdict, trained or under-trained "
                    "with the reasons. Wire it to Preview Any to read it.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        prompts: str,
        negative_prompt: str,
        width: int,
        height: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        seed: int,
        images: int,
        batch_size: int,
        hook: str,
        latents: int,
        k: int,
        file_name: str,
    ) -> io.NodeOutput:
        lines = prompt_lines(prompts, "prompts")
        if k > latents:
            raise ValueError(f"k ({k}) must be <= latents ({latents}): lower k or raise latents")
        point = parse_hook(hook)
        info = check_hook(model, point)
        path = files.new_sae_path(file_name)
        runs = plan_runs(len(lines), spread(images, len(lines)), batch_size, seed, paired=False)
        store = _Store(seed)
        recording = add_recorder(model, point, store.sink)
        negative = encode(clip, negative_prompt)
        positives = {p: encode(clip, lines[p]) for p in sorted({run.prompt for run in runs})}
        settings = RunSettings(steps, cfg, sampler_name, scheduler)
        progress = comfy.utils.ProgressBar(len(runs) * steps + TRAIN_PROGRESS)
        for run in runs:
            latent = empty_latent(model, run.batch, width, height)
            sample(recording, positives[run.prompt], negative, latent, run.seed, settings, progress)
            store.image += run.batch
        # the trainer copies what it trains on
        source = MemorySource(store.batch(point.name), hook=point.name)
        rows = source.num_rows * rows_per_activation(source.row_shape)
        result = _train(source, latents, k, rows, seed, info.family, progress)
        if result.interrupted:
            # never replace a file this run did not create (an older SAE, with its feature sets beside it)
            target = files.free_path(path, "cancelled") if os.path.lexists(path) else path
            save_sae(result.sae, target)
            logger.warning(
                "diffbias: training cancelled after %d steps; saved the best weights so far to %s%s",
                result.stats.step,
                target,
                f" ({path} is unchanged)" if target != path else "",
            )
            comfy.model_management.throw_exception_if_processing_interrupted()
        save_sae(result.sae, path)
        sae = load_sae(path)
        report = (f"{files.display_name(path)}: {describe_sae(sae)}; {rows} activation rows recorded "
                  f"({result.check.heldout_rows} held out)\n")  # fmt: skip
        report += result.check.summary()
        if result.check.verdict != "trained":
            logger.warning("diffbias: %s is %s: %s", files.display_name(path), result.check.verdict,
                           "; ".join(result.check.reasons))  # fmt: skip
        return io.NodeOutput(SaeWire(sae, path), report, ui=ui.PreviewText(report))


class _Store:
    """The activations recorded while sampling: at most :data:`STORE_VALUES` values, a uniform sample beyond."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.image = 0
        """Images sampled before the current run (sample ids of the current run start here)."""
        self.reservoir: Reservoir | None = None

    def sink(self, captured: Captured) -> None:
        maps = to_map(captured.activations)  # (n, C, H, W); DiT tokens as (n, C, T, 1)
        if self.reservoir is None:
            self.reservoir = Reservoir(max(1, STORE_VALUES // maps[0].numel()), seed=self.seed % 2**31)
        ids = captured.image.cpu() + self.image  # one sample id per image: held out whole
        self.reservoir.add(maps.float(), ids, torch.full_like(ids, captured.step))

    def batch(self, hook: str):
        """The kept activations as an ActivationBatch; RuntimeError when none reached the hook."""
        if self.reservoir is None:
            raise RuntimeError(
                f"no activation reached hook {hook!r} while sampling; is the model "
                f"patched by another node that skips this block?"
            )
        return self.reservoir.batch()


def _train(source: MemorySource, latents: int, k: int, rows: int, seed: int, family: str, progress):
    """train_sae on the recorded activations, on ComfyUI's device, with the progress bar and Cancel."""
    config = config_for_rows(latents, k, rows, seed=seed % 2**31)
    device = comfy.model_management.get_torch_device()
    done = {"shown": 0}

    def advance(stats) -> None:
        shown = min(TRAIN_PROGRESS, TRAIN_PROGRESS * stats.step // max(1, config.min_steps))
        progress.update(shown - done["shown"])
        done["shown"] = shown

    return train_sae(source, config, sae_options={"model_family": family, "device": device},
                     progress=advance, stop=comfy.model_management.processing_interrupted)  # fmt: skip
