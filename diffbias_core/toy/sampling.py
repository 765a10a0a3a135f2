"""Sampling the toy model with a hook on its bottleneck (``unet.middle``): capture and edit.

An :data:`EditFn` receives the bottleneck activation of the rows being sampled and returns the
(possibly) edited activation; a :data:`CaptureFn` sees the unedited one. Both know which rows of
the whole request they hold and which sampling step it is, so per-image classes and step windows
are easy to express.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor

from ..base.hooks import edit_outputs
from .diffusion import sample_in_chunks
from .model import HOOK_MODULES, ToyUNet

HOOK = "unet.middle"
"""The one hook point of the toy model (named as in docs/ARCHITECTURE.md)."""


class StepContext(NamedTuple):
    """Where a hook call is: rows of the request, step index (0 = noisiest), time t in [0, 1], steps."""

    rows: slice
    step: int
    t: float
    steps: int


EditFn = Callable[[Tensor, StepContext], Tensor]
"""``edit(h, ctx) -> h'`` with h, h': (rows, C, H, W)."""
CaptureFn = Callable[[Tensor, StepContext], None]
"""``capture(h, ctx)`` with h: (rows, C, H, W), the unedited activation."""


@torch.no_grad()
def generate(
    model: ToyUNet,
    prompt: Tensor,
    noise: Tensor,
    steps: int,
    *,
    edit: EditFn | None = None,
    capture: CaptureFn | None = None,
    chunk: int = 500,
    on_chunk_done: Callable[[int], None] | None = None,
) -> Tensor:
    """DDIM images with optional capture/edit at ``unet.middle``.

    prompt: (N, PROMPT_LENGTH) int64, noise: (N, 3, S, S) -> images (N, 3, S, S) in [-1, 1].
    """
    where: dict[str, StepContext] = {}

    def on_step(rows: slice, i: int, t: float) -> None:
        where["ctx"] = StepContext(rows, i, t, steps)

    def at_hook(h: Tensor) -> Tensor:
        ctx = where["ctx"]
        if capture is not None:
            capture(h, ctx)
        return edit(h, ctx) if edit is not None else h

    with edit_outputs(model, HOOK_MODULES[HOOK], at_hook) if (edit or capture) else nullcontext():
        return sample_in_chunks(
            model, prompt, noise, steps, chunk=chunk, callback=on_step, on_chunk_done=on_chunk_done
        )


class Captured(NamedTuple):
    """Bottleneck activations of every image at every step."""

    activations: Tensor
    """(N, steps, C, H, W) float32."""
    t: Tensor
    """(steps,) float32 time of each step."""


class Recorder:
    """A :data:`CaptureFn` that stores every step's activation of every row: (N, steps, C, H, W)."""

    def __init__(
        self, n: int, steps: int, shape: tuple[int, int, int], dtype: torch.dtype = torch.float32
    ) -> None:
        self.store = torch.zeros(n, steps, *shape, dtype=dtype)
        self.t = torch.zeros(steps)

    def __call__(self, h: Tensor, ctx: StepContext) -> None:
        self.store[ctx.rows, ctx.step] = h.to(self.store.dtype)
        self.t[ctx.step] = ctx.t

    def result(self) -> Captured:
        """The captured activations."""
        return Captured(self.store, self.t)


def in_window(ctx: StepContext, start: float, end: float) -> bool:
    """True when step ``ctx.step`` lies in the fraction window [start, end) of the schedule."""
    position = ctx.step / ctx.steps
    return start <= position < end


__all__ = ["HOOK", "CaptureFn", "Captured", "EditFn", "Recorder", "StepContext", "generate", "in_window"]
