"""Train the toy diffusion model on the synthetic world, save it, and measure the bias it learned.

``python -m diffbias_core.toy train`` reproduces the shipped weights (``weights/toy_unet.safetensors``
and ``weights/toy_unet.json``). Data is drawn on the fly from the world with a seeded generator.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.atomic import atomic_write
from ..base.progress import Progress
from ..sae.formats import read_header, read_safetensors, write_safetensors
from . import world as W
from .diffusion import initial_noise, sample_in_chunks, v_loss
from .model import MODEL_FAMILY, ToyUNet, UNetConfig
from .oracles import read

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Folder of the shipped weights."""
MODEL_FILE = "toy_unet.safetensors"
"""File name of the shipped UNet (EMA weights)."""
REPORT_FILE = "toy_unet.json"
"""File name of the JSON beside it: training config and the measured bias."""
FORMAT = "diffbias-toy-unet"


@dataclass(frozen=True)
class ToyTrainConfig:
    """How the toy UNet is trained."""

    steps: int = 15000
    """Optimizer steps (>= 1)."""
    batch_size: int = 64
    """Images per step (>= 1)."""
    lr: float = 1e-3
    """AdamW learning rate (> 0), constant after a linear warm-up: a run stopped at step N equals a
    run of N steps, so checkpoints are reproducible by ``--steps N``."""
    warmup: int = 200
    """Warm-up steps (>= 0)."""
    ema_decay: float = 0.999
    """Decay of the weight average that is saved, in [0, 1)."""
    seed: int = 0
    """Seed of the data, noise and initialisation."""
    world: W.WorldConfig = field(default_factory=W.WorldConfig)
    """The synthetic world (its skew is the bias the model should learn)."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    """Network widths."""
    measure_samples: int = 500
    """Images per shape generated after training to measure the learned bias (>= 1)."""
    measure_steps: int = 10
    """DDIM steps for that measurement (>= 1)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "measure_samples", "measure_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"need lr > 0 and warmup >= 0, got lr={self.lr}, warmup={self.warmup}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.unet.image_size != self.world.image_size:
            raise ValueError(
                f"unet.image_size ({self.unet.image_size}) must equal world.image_size ({self.world.image_size})"
            )


def _lr_factor(step: int, config: ToyTrainConfig) -> float:
    return min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0


def train_model(
    config: ToyTrainConfig,
    init: ToyUNet | None = None,
    *,
    show_progress: bool = True,
    checkpoint: Callable[[int, ToyUNet], None] | None = None,
    checkpoint_every: int = 1000,
) -> ToyUNet:
    """Train (or, given ``init``, fine-tune a copy of) the UNet; returns the EMA model in eval mode.

    ``checkpoint(steps_done, ema_model)`` is called every ``checkpoint_every`` steps.
    """
    torch.manual_seed(config.seed)  # only for parameter initialisation inside nn.Module constructors
    model = copy.deepcopy(init).requires_grad_(True) if init is not None else ToyUNet(config.unet)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    generator = torch.Generator().manual_seed(config.seed)
    running = None
    with Progress(config.steps, "train toy UNet", enabled=show_progress) as bar:
        for step in range(config.steps):
            scenes = W.sample_training_scenes(config.world, config.batch_size, generator)
            x0 = W.render(scenes, config.world.image_size)
            prompt = W.tokens(scenes.shape, torch.where(scenes.named, scenes.colour, -1))
            loss = v_loss(model, x0, prompt, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 500 == 0 or step == config.steps - 1:
                log.info("step %d/%d loss %.4f", step, config.steps, running)
            if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
                checkpoint(step + 1, ema)
            bar.update()
    return ema


@torch.no_grad()
def measure_bias(
    model: ToyUNet,
    world: W.WorldConfig,
    samples: int,
    steps: int,
    seed: int,
    *,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Generate ``samples`` images per shape from the neutral and from every colour-named prompt and
    read them with the oracles.

    Returns {"neutral": {shape: {"proportions": {colour: p}, "fd": x, "shape_accuracy": a,
    "unreadable": u}}, "named_colour_accuracy": a, "named_shape_accuracy": a}.
    """
    n_shapes, n_colours = len(W.SHAPES), len(W.COLOURS)
    shape = torch.arange(n_shapes).repeat_interleave(samples)
    named = max(samples // n_colours, 1)
    named_shape = torch.arange(n_shapes).repeat_interleave(n_colours * named)
    named_colour = torch.arange(n_colours).repeat_interleave(named).repeat(n_shapes)
    prompts = torch.cat([W.tokens(shape), W.tokens(named_shape, named_colour)])
    noise = initial_noise(prompts.shape[0], world.image_size, seed)
    with Progress(prompts.shape[0], "measure learned bias", enabled=show_progress) as bar:
        images = sample_in_chunks(model, prompts, noise, steps, on_chunk_done=bar.update)
    reading = read(images)
    neutral, rest = reading.colour[: shape.shape[0]], reading.colour[shape.shape[0] :]
    neutral_shape = reading.shape[: shape.shape[0]]
    uniform = torch.full((n_colours,), 1.0 / n_colours)
    report: dict[str, Any] = {"neutral": {}}
    for k, name in enumerate(W.SHAPES):
        sel = shape == k
        colours = neutral[sel]
        counts = torch.stack([(colours == c).sum() for c in range(n_colours)]).float()
        props = counts / sel.sum()
        report["neutral"][name] = {
            "proportions": {W.COLOURS[c]: round(float(props[c]), 4) for c in range(n_colours)},
            "fd": round(float((props - uniform).norm()), 4),
            "shape_accuracy": round(float((neutral_shape[sel] == k).float().mean()), 4),
            "unreadable": round(float((colours < 0).float().mean()), 4),
        }
    report["named_colour_accuracy"] = round(float((rest == named_colour).float().mean()), 4)
    report["named_shape_accuracy"] = round(
        float((reading.shape[shape.shape[0] :] == named_shape).float().mean()), 4
    )
    report["samples_per_shape"] = samples
    report["steps"] = steps
    report["seed"] = seed
    return report


def config_to_json(config: ToyTrainConfig) -> dict[str, Any]:
    """The training config as plain JSON values."""
    return json.loads(json.dumps(asdict(config)))


def world_from_json(data: dict[str, Any]) -> W.WorldConfig:
    """Inverse of ``asdict(WorldConfig)``."""
    data = dict(data)
    data["skew"] = tuple(tuple(float(p) for p in row) for row in data["skew"])
    return W.WorldConfig(**data)


def unet_from_json(data: dict[str, Any]) -> UNetConfig:
    """Inverse of ``asdict(UNetConfig)``."""
    data = dict(data)
    data["widths"] = tuple(int(w) for w in data["widths"])
    return UNetConfig(**data)


def save_model(model: ToyUNet, world: W.WorldConfig, path: Path) -> None:
    """Write the UNet as safetensors (atomic, with the digests every file of the project records) with its
    UNet and world configs in the metadata."""
    tensors = {
        name: p.detach().to("cpu", torch.float32).contiguous() for name, p in model.state_dict().items()
    }
    metadata = {
        "format": FORMAT,
        "format_version": "1",
        "model_family": MODEL_FAMILY,
        "unet_config": json.dumps(asdict(model.config)),
        "world_config": json.dumps(asdict(world)),
    }
    write_safetensors(tensors, metadata, path)


def load_model(path: Path | None = None) -> tuple[ToyUNet, W.WorldConfig]:
    """Load a UNet saved by :func:`save_model` (default: the shipped one), its digests verified when it has
    them (FormatError naming a damaged tensor). Returns (model in eval mode, world)."""
    path = Path(path) if path is not None else WEIGHTS_DIR / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"toy model file {path} does not exist; train one with python -m diffbias_core.toy train"
        )
    _, metadata = read_header(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path}: expected format {FORMAT!r} in the safetensors metadata, found {metadata.get('format')!r}"
        )
    tensors, _ = read_safetensors(path)
    model = ToyUNet(unet_from_json(json.loads(metadata["unet_config"])))
    model.load_state_dict(tensors)
    return model.eval().requires_grad_(False), world_from_json(json.loads(metadata["world_config"]))


def write_json(data: dict[str, Any], path: Path) -> None:
    """Atomic, indented JSON write."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def train_and_save(config: ToyTrainConfig, out_dir: Path, *, show_progress: bool = True) -> dict[str, Any]:
    """Train, save ``toy_unet.safetensors`` and ``toy_unet.json`` (config + measured bias) in ``out_dir``."""

    def save_checkpoint(done: int, ema: ToyUNet) -> None:
        save_model(ema, config.world, Path(out_dir) / MODEL_FILE)
        log.info("checkpoint after %d steps written to %s", done, Path(out_dir) / MODEL_FILE)

    model = train_model(config, show_progress=show_progress, checkpoint=save_checkpoint)
    save_model(model, config.world, Path(out_dir) / MODEL_FILE)
    bias = measure_bias(
        model,
        config.world,
        config.measure_samples,
        config.measure_steps,
        config.seed + 1,
        show_progress=show_progress,
    )
    report = {"train_config": config_to_json(config), "learned_bias": bias}
    write_json(report, Path(out_dir) / REPORT_FILE)
    return report


__all__ = [
    "MODEL_FILE",
    "REPORT_FILE",
    "WEIGHTS_DIR",
    "ToyTrainConfig",
    "load_model",
    "measure_bias",
    "save_model",
    "train_and_save",
    "train_model",
    "write_json",
]
