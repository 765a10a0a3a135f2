"""Sampler runs of the analysis nodes: which prompt, how many images and which seed each run gets."""

from __future__ import annotations

from typing import NamedTuple


class Run(NamedTuple):
    """One sampler run."""

    prompt: int
    """Index of the prompt (or class) the run samples."""
    first: int
    """Index of the run's first image among the prompt's images (its noise id)."""
    batch: int
    """Images in the run."""
    seed: int
    """Noise seed of the run. Runs with the same ``first`` share it, so paired prompts share their noise."""


def plan_runs(prompts: int, images_per_prompt: list[int], batch: int, seed: int, paired: bool) -> list[Run]:
    """Runs of at most ``batch`` images per prompt.

    images_per_prompt: how many images each of the ``prompts`` prompts gets. paired: the j-th chunk of
    every prompt uses ``seed + j`` (same noise for every prompt); otherwise run i uses ``seed + i``.
    """
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    runs = []
    for p in range(prompts):
        for chunk, first in enumerate(range(0, images_per_prompt[p], batch)):
            run_seed = seed + (chunk if paired else len(runs))
            runs.append(Run(p, first, min(batch, images_per_prompt[p] - first), run_seed))
    return runs


def spread(images: int, prompts: int) -> list[int]:
    """``images`` split over ``prompts`` as evenly as possible, earlier prompts first."""
    return [images // prompts + (1 if p < images % prompts else 0) for p in range(prompts)]


__all__ = ["Run", "plan_runs", "spread"]
