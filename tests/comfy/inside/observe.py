"""Observing a hook point while ComfyUI samples, independently of the plugin.

:func:`watch` installs an observer at ComfyUI's own patch point of a hook point, after whatever patches
are there (so it sees the activation as the rest of the model will); :func:`block_module` names the
torch module whose output the hook point is. The mapping from hook point names to ComfyUI's patch points
is written out here, not taken from the plugin.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .families import TOKENS, Family


class Call(NamedTuple):
    """One model call at a hook point, as an observer after the plugin's patch saw it."""

    img: Tensor
    """The hooked activation, every row: (B, C, H, W) for a UNet block, (B, T_img, C) image tokens."""
    txt: Tensor | None
    """Text tokens leaving a DiT block (B, T_txt, C) (cross-attention DiTs: their context); None for UNets."""
    chunks: list[int]
    """``cond_or_uncond`` of the call: 0 = cond chunk, 1 = uncond chunk, ``B / len`` rows each."""
    sigma: float
    """Sigma of the call's first row."""
    options: dict[str, Any]
    """A copy of the call's ``transformer_options`` (the intervention's run state is under its key)."""


def parse(hook: str) -> tuple[str, int]:
    """``unet.middle`` -> ("middle", 0); ``dit.single.3`` -> ("single", 3)."""
    parts = hook.split(".")
    return parts[1], int(parts[2]) if len(parts) > 2 else 0


def watch(model, hook: str, calls: list[Call]):
    """A clone of ``model`` that appends a :class:`Call` to ``calls`` whenever the activation at ``hook``
    leaves the patches installed so far. The mapping to ComfyUI's patch points is written out here, not
    taken from the plugin: ``unet.input.N`` -> input_block_patch at block ("input", N); ``unet.middle``
    and ``unet.output.N`` -> output_block_patch at ("output", 0) and ("output", N + 1), which see the
    middle block's and output block N's result before the skip concat; ``dit.<kind>.N`` -> the
    (<kind>_block, N) replace patch, wrapping the one present. Single blocks hold TOKENS text tokens first.
    """
    clone = model.clone()
    kind, index = parse(hook)

    def note(img, txt, options):
        sigmas = options.get("sigmas")
        sigma = float(sigmas.reshape(-1)[0]) if isinstance(sigmas, Tensor) else float("nan")
        calls.append(
            Call(
                img.clone(),
                None if txt is None else txt.clone(),
                list(options["cond_or_uncond"]),
                sigma,
                dict(options),
            )
        )

    if kind == "input":

        def input_patch(h, options):
            if options.get("block") == ("input", index):
                note(h, None, options)
            return h

        clone.set_model_input_block_patch(input_patch)
    elif kind in ("middle", "output"):
        block = ("output", 0 if kind == "middle" else index + 1)

        def output_patch(h, hsp, options):
            if options.get("block") == block:
                note(h, None, options)
            return h, hsp

        clone.set_model_output_block_patch(output_patch)
    else:
        name = f"{kind}_block"
        previous = (
            clone.model_options["transformer_options"]
            .get("patches_replace", {})
            .get("dit", {})
            .get((name, index))
        )

        def block_patch(args, extra):
            out = previous(args, extra) if previous is not None else extra["original_block"](args)
            options = args["transformer_options"]
            if kind == "single":
                note(out["img"][:, TOKENS:], out["img"][:, :TOKENS], options)
            else:
                note(out["img"], out.get("txt", args.get("txt")), options)
            return out

        clone.set_model_patch_replace(block_patch, "dit", name, index)
    return clone


def block_module(family: Family, net: torch.nn.Module, hook: str) -> torch.nn.Module:
    """The module whose output the hook point names (UNet blocks run their layers one by one: the last)."""
    kind, index = parse(hook)
    if kind == "input":
        return net.input_blocks[index][-1]
    if kind == "middle":
        return net.middle_block[-1]
    if kind == "output":
        return net.output_blocks[index][-1]
    return (getattr(net, family.blocks) if kind == "double" else net.single_blocks)[index]


def first_step(calls: list[Call]) -> list[Call]:
    """The calls of the first sampling step (the cond and uncond chunks may come in one call or two)."""
    if not calls:
        raise AssertionError("the observer never saw the hook point: the model did not call that patch point")
    return [call for call in calls if call.sigma == calls[0].sigma]


def rows_of(calls: list[Call], chunk_kind: int, field: str = "img") -> Tensor:
    """Rows of the first step's chunks of one kind (0 cond, 1 uncond), in image order: (images, ...)."""
    rows = []
    for call in first_step(calls):
        value = getattr(call, field)
        per = value.shape[0] // len(call.chunks)
        rows += [value[i * per : (i + 1) * per] for i, kind in enumerate(call.chunks) if kind == chunk_kind]
    if not rows:
        raise AssertionError(
            f"no chunk of kind {chunk_kind} in the first step (sample with cfg > 1 for both)"
        )
    return torch.cat(rows)


def cloned(value):
    """A copy of a module's output (later blocks update their input in place)."""
    if isinstance(value, Tensor):
        return value.clone()
    return tuple(cloned(v) for v in value) if isinstance(value, tuple | list) else value


def width_of(family: Family, img: Tensor) -> int:
    return img.shape[1] if family.blocks == "" else img.shape[-1]


__all__ = ["Call", "block_module", "cloned", "first_step", "parse", "rows_of", "watch", "width_of"]
