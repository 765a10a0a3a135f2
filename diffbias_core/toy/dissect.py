"""Dissect the toy model: capture its bottleneck while it samples and train a TopK SAE on it.

``python -m diffbias_core.toy train-sae`` reproduces the shipped SAE (``weights/toy_sae.safetensors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.layout import map_to_rows
from ..base.progress import Progress
from ..dissect.train import SaeTrainer, TrainConfig
from ..sae.formats import load_sae, save_sae
from ..sae.model import SparseAutoencoder
from . import world as W
from .diffusion import initial_noise
from .model import MODEL_FAMILY, ToyUNet
from .sampling import HOOK, Recorder, generate

SAE_FILE = "toy_sae.safetensors"
"""File name of the shipped SAE in the weights folder."""


@dataclass(frozen=True)
class ToySaeConfig:
    """How the toy SAE is trained."""

    num_latents: int = 512
    """Dictionary size (8x the 64-channel bottleneck)."""
    k: int = 8
    """Active latents per position."""
    images_per_prompt: int = 150
    """Images per prompt; prompts are every shape, neutral and with each colour named."""
    steps: int = 10
    """DDIM steps of the captured runs (every step is captured)."""
    epochs: int = 3
    """Passes over the captured rows."""
    batch_size: int = 1024
    """Rows per SAE optimizer step."""
    seed: int = 0
    """Seed of the capture noise and of the SAE initialisation."""

    def __post_init__(self) -> None:
        for name in ("num_latents", "k", "images_per_prompt", "steps", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ToySaeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.num_latents:
            raise ValueError(f"ToySaeConfig.k must be <= num_latents ({self.num_latents}), got {self.k}")


def dissection_prompts(images_per_prompt: int) -> torch.Tensor:
    """Every shape, neutral and with each colour named, ``images_per_prompt`` times: (N, PROMPT_LENGTH)."""
    shape = torch.arange(len(W.SHAPES)).repeat_interleave(len(W.COLOURS) + 1)
    colour = torch.arange(-1, len(W.COLOURS)).repeat(len(W.SHAPES))
    return W.tokens(shape, colour).repeat_interleave(images_per_prompt, dim=0)


def train_toy_sae(model: ToyUNet, config: ToySaeConfig, *, show_progress: bool = True) -> SparseAutoencoder:
    """Capture ``unet.middle`` at every step of DDIM runs and train a per-position TopK SAE on it."""
    prompts = dissection_prompts(config.images_per_prompt)
    noise = initial_noise(prompts.shape[0], model.config.image_size, config.seed + 1000)
    recorder = Recorder(prompts.shape[0], config.steps, model.config.bottleneck_shape)
    with Progress(prompts.shape[0], "capture for SAE", enabled=show_progress) as bar:
        generate(model, prompts, noise, config.steps, capture=recorder, on_chunk_done=bar.update)
    maps = recorder.result().activations.flatten(0, 1)  # (N * steps, C, H, W)
    rows = map_to_rows(maps)  # (N * steps * H * W, C)
    train_config = TrainConfig(
        num_latents=config.num_latents,
        k=config.k,
        batch_size=config.batch_size,
        warmup_steps=50,
        seed=config.seed,
        buffer_batches=8,
        dead_after_rows=200_000,
    )
    trainer = SaeTrainer(train_config, rows.shape[1], hook=HOOK, model_family=MODEL_FAMILY)
    generator = torch.Generator().manual_seed(config.seed)
    with Progress(config.epochs, "train SAE", enabled=show_progress) as bar:
        for _ in range(config.epochs):
            order = torch.randperm(rows.shape[0], generator=generator)
            for start in range(0, rows.shape[0], 16 * config.batch_size):
                trainer.feed(rows[order[start : start + 16 * config.batch_size]])
            bar.update()
    trainer.finish()
    trainer.run.extra.update(
        {
            "captured_images": str(prompts.shape[0]),
            "capture_steps": str(config.steps),
            "source": "diffbias_core.toy.dissect",
        }
    )
    return trainer.best_sae().eval().requires_grad_(False)


def save_toy_sae(sae: SparseAutoencoder, path: Path) -> None:
    """Write the SAE as a native diffbias SAE file (atomic)."""
    save_sae(sae, path)


def load_toy_sae(path: Path) -> SparseAutoencoder:
    """Load an SAE file and check that it fits the toy hook."""
    sae = load_sae(path)
    if sae.hook != HOOK:
        raise ValueError(f"{path}: the SAE was trained on hook {sae.hook!r}, the toy demo needs {HOOK!r}")
    return sae.eval().requires_grad_(False)


__all__ = ["SAE_FILE", "ToySaeConfig", "dissection_prompts", "load_toy_sae", "save_toy_sae", "train_toy_sae"]
