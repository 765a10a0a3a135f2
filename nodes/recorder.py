"""Activation capture while sampling: a hook function that hands the hooked activation to a sink, unchanged.

Used by Train Bias SAE and Attribute Bias Features (through :func:`add_recorder`); installed by
``patching.install``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .model_info import HookPoint
from .patching import SharedPatch, chosen_chunks, install, row_sigmas, step_index


class Captured(NamedTuple):
    """One hook call's activations of the chosen rows."""

    activations: Tensor
    """(rows, C, H, W) UNet map or (rows, T, C) image tokens, detached, on the model's device."""
    image: Tensor
    """(rows,) int64 index of the image in the sampled batch."""
    step: int
    """Sampling step (index into the run's schedule)."""
    sigma: float
    """The row's sigma."""


class Recorder(SharedPatch):
    """A hook function that passes the activation of the conditional rows to ``sink`` and changes nothing."""

    def __init__(self, sink: Callable[[Captured], None], cond_only: bool = True) -> None:
        self.sink = sink
        self.cond_only = cond_only

    def __call__(self, h: Tensor, transformer_options: dict) -> Tensor:
        chosen, _, per = chosen_chunks(transformer_options, h.shape[0], self.cond_only)
        rows = [i * per + j for i in chosen for j in range(per)]
        if not rows:
            return h
        sigmas = row_sigmas(transformer_options, h.shape[0])
        sigma = sigmas[rows[0]] if sigmas is not None else torch.zeros(())
        index = torch.tensor(rows, device=h.device)
        self.sink(
            Captured(
                h.detach().index_select(0, index),
                index.cpu() % per,
                step_index(transformer_options, sigma),
                float(sigma),
            )
        )
        return h


def add_recorder(model, hook: HookPoint, sink: Callable[[Captured], None], cond_only: bool = True):
    """A clone of ``model`` that hands the activations at ``hook`` to ``sink`` while it samples."""
    clone = model.clone()
    install(clone, hook, Recorder(sink, cond_only))
    return clone


__all__ = ["Captured", "Recorder", "add_recorder"]
