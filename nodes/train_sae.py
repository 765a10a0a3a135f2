"""Train Bias SAE: sample images and train a TopK SAE on one hook point while they are generated."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..diffbias_core import load_sae
from ..diffbias_core.train import SaeTrainer, TrainConfig
from . import files
from .model_info import check_hook, parse_hook
from .patching import Captured, add_recorder
from .runs import plan_runs, spread
from .sampling import RunSettings, empty_latent, encode, prompt_lines, sample
from .widgets import negative_prompt_input, sampler_inputs, size_inputs
from .wires import SaeType, SaeWire, describe_sae

logger = logging.getLogger(__name__)
_ROWS_PER_BATCH_STEP = 64  # aim for at least this many optimizer steps on small runs


def train_config(latents: int, k: int, expected_rows: int, seed: int) -> TrainConfig:
    """A TrainConfig sized to the expected number of rows (smaller batches and warm-up for small runs)."""
    batch = max(16, min(4096, expected_rows // _ROWS_PER_BATCH_STEP))
    warmup = min(1000, expected_rows // batch // 10)
    return TrainConfig(num_latents=latents, k=k, batch_size=batch, warmup_steps=warmup, seed=seed)


def trainer_rows(captured: Captured) -> torch.Tensor:
    """Rows (or maps) for ``SaeTrainer.feed``: UNet maps as they are, DiT tokens (rows, T, C) -> (rows*T, C)."""
    x = captured.activations
    return x if x.ndim == 4 else x.reshape(-1, x.shape[-1])  # (rows*T, C)


class TrainSAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasTrainSAE",
            display_name="Train Bias SAE (DiffBias)",
            category="diffbias/sae",
            description=(
                "Generates images from the prompts and trains a TopK sparse autoencoder on the activation at "
                "the hook point while they are sampled (streaming: memory stays bounded). Saves it to "
                "ComfyUI/models/sae. Cancelling keeps what was learned so far in a valid file."
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
                    tooltip="Training summary: rows seen, steps, FVU, dead latents, file.",
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
        state: dict[str, SaeTrainer] = {}

        def sink(captured: Captured) -> None:
            with torch.inference_mode(False), torch.enable_grad():
                rows = trainer_rows(captured).clone()
                if "trainer" not in state:
                    x = captured.activations  # (n, C, H, W) map or (n, T, C) tokens
                    per_image = x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]
                    config = train_config(latents, k, per_image * images * steps, seed)
                    state["trainer"] = SaeTrainer(
                        config, rows.shape[1], hook=point.name, model_family=info.family, device=rows.device
                    )
                state["trainer"].feed(rows)

        recording = add_recorder(model, point, sink)
        negative = encode(clip, negative_prompt)
        positives = {p: encode(clip, lines[p]) for p in sorted({run.prompt for run in runs})}
        settings = RunSettings(steps, cfg, sampler_name, scheduler)
        progress = comfy.utils.ProgressBar(len(runs) * steps)
        try:
            for run in runs:
                latent = empty_latent(model, run.batch, width, height)
                sample(recording, positives[run.prompt], negative, latent, run.seed, settings, progress)
        except comfy.model_management.InterruptProcessingException:
            trainer = state.get("trainer")
            if trainer is not None and trainer.stats.step > 0:
                trainer.request_stop()
                # never replace a file this run did not create (an older SAE, with its feature sets beside it)
                target = files.free_path(path, "cancelled") if os.path.lexists(path) else path
                trainer.save(target)
                logger.warning(
                    "diffbias: training cancelled after %d steps; saved the best weights so far to %s%s",
                    trainer.stats.step,
                    target,
                    f" ({path} is unchanged)" if target != path else "",
                )
            raise
        if "trainer" not in state:
            raise RuntimeError(
                f"no activation reached hook {point.name!r} while sampling; is the model "
                f"patched by another node that skips this block?"
            )
        trainer = state["trainer"]
        with torch.inference_mode(False), torch.enable_grad():
            stats = trainer.finish()
        trainer.save(path)
        sae = load_sae(path)
        report = (
            f"{files.display_name(path)}: {describe_sae(sae)}; {stats.rows} rows, {stats.step} steps, "
            f"FVU {stats.fvu:.3f} (best {stats.best_fvu:.3f}), dead latents {stats.dead_fraction:.1%}"
        )
        return io.NodeOutput(SaeWire(sae, path), report, ui=ui.PreviewText(report))
