"""Sampling inside a node: prompts to conditioning, a latent batch, one sampler run with progress.

The same calls as ComfyUI's KSampler node (``comfy.sample.sample`` with ``prepare_noise``), so an image
sampled here equals the one the KSampler makes from the same seed and settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import comfy.model_management
import comfy.sample
import comfy.utils
import torch
from torch import Tensor


def prompt_lines(text: str, what: str, minimum: int = 1) -> list[str]:
    """Non-empty lines of a multi-line prompt widget; ValueError if fewer than ``minimum``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < minimum:
        raise ValueError(
            f"{what}: expected at least {minimum} non-empty line(s), one prompt per line, got {len(lines)}; "
            "write one prompt per line"
        )
    return lines


def class_prompts(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class names, prompts) from one prompt per line, at least two.

    ``name: prompt`` lines name their class when every line has a distinct plain name (letters, digits,
    spaces, ``_``, ``-``; starting with a letter; not ``embedding``) followed by ``:`` and a space. Anything
    else is a prompt as written, for CLIP Text Encode's syntax (``(male:1.2)``, ``style: x``,
    ``embedding:name``) to reach the text encoder untouched, and the name is what differs between the lines
    ("a photo of a (male:1.2) person" / "... (female:1.2) person" -> "male" / "female").
    """
    lines = prompt_lines(text, "class prompts", minimum=2)
    named = [_NAMED.match(line) for line in lines]
    if (
        all(named)
        and len({m["name"].strip().lower() for m in named}) == len(lines)
        and not any(m["name"].strip().lower() == "embedding" for m in named)
    ):
        names, prompts = [m["name"].strip() for m in named], [m["prompt"].strip() for m in named]
    else:
        words = [line.split() for line in lines]
        head = 0
        while all(len(w) > head for w in words) and len({w[head] for w in words}) == 1:
            head += 1
        tail = 0
        while all(len(w) > head + tail for w in words) and len({w[-1 - tail] for w in words}) == 1:
            tail += 1
        names = [" ".join(w[head : len(w) - tail]) for w in words]
        plain = [_WEIGHT.sub(r"\g<text>", name).strip("()[]{}\\ ") for name in names]  # (male:1.2) -> male
        names = plain if all(plain) and len(set(plain)) == len(plain) else names
        prompts = lines
    names = [name.replace(",", " ").strip() for name in names]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(
            f"class prompts: could not tell the classes apart (names {names}); start each line with its class "
            "name, e.g. 'male: a photo of a man' / 'female: a photo of a woman'"
        )
    return tuple(names), tuple(prompts)


def encode(clip, text: str) -> list:
    """ComfyUI conditioning of ``text`` (as CLIPTextEncode makes it)."""
    if clip is None:
        raise ValueError("the CLIP input is empty: connect the text encoder of the checkpoint")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def empty_latent(model, batch: int, width: int, height: int) -> Tensor:
    """(batch, channels, height/8, width/8) zeros with the model's latent channel count."""
    latent = torch.zeros([batch, 4, height // 8, width // 8])
    return comfy.sample.fix_empty_latent_channels(model, latent)


def decode(vae, latent: Tensor) -> Tensor:
    """IMAGE (B, H, W, 3) in [0, 1] of a denoised latent (B, C, h, w), as VAEDecode makes it."""
    if vae is None:
        raise ValueError("the VAE input is empty: connect the checkpoint's VAE to decode the sampled images")
    images = vae.decode(latent)
    if images.ndim == 5:  # video VAEs return (B, frames, H, W, 3)
        images = images.reshape(-1, *images.shape[-3:])
    return images


_NAMED = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9 _-]{0,39}):\s+(?P<prompt>\S.*)$")
_WEIGHT = re.compile(r"\((?P<text>[^():]*):\s*[-+]?[0-9]*\.?[0-9]+\s*\)")  # CLIP Text Encode's (text:weight)


class RunSettings(NamedTuple):
    """Sampler settings shared by the runs of one node (the KSampler's widgets)."""

    steps: int
    """Sampling steps."""
    cfg: float
    """Classifier-free guidance scale."""
    sampler_name: str
    """One of ``comfy.samplers.KSampler.SAMPLERS``."""
    scheduler: str
    """One of ``comfy.samplers.KSampler.SCHEDULERS``."""


def sample(
    model,
    positive: list,
    negative: list,
    latent: Tensor,
    seed: int,
    settings: RunSettings,
    progress: comfy.utils.ProgressBar | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Sample ``latent`` (B, C, h, w) from ``seed``; returns the denoised latent (B, C, h, w).

    ``progress`` advances by one per step; the user's cancel is checked at every step.
    """
    noise = comfy.sample.prepare_noise(latent, seed)

    def callback(step: int, x0, x, total_steps: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if progress is not None:
            progress.update(1)
        if on_step is not None:
            on_step(step)

    comfy.model_management.throw_exception_if_processing_interrupted()
    return comfy.sample.sample(
        model,
        noise,
        settings.steps,
        settings.cfg,
        settings.sampler_name,
        settings.scheduler,
        positive,
        negative,
        latent,
        callback=callback,
        disable_pbar=True,
        seed=seed,
    )


__all__ = ["RunSettings", "class_prompts", "decode", "empty_latent", "encode", "prompt_lines", "sample"]
