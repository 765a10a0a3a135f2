"""The one module that knows ComfyUI's transformer_options, patch names, wrapper keys and batch layout.

A hook function ``fn(h, transformer_options) -> h`` is installed at a hook point (see
``model_info.HookPoint``) with :func:`install`; ``h`` is the hooked activation, (B, C, H, W) for a UNet block
or (B, T, C) image tokens for a DiT block. The seam objects below adapt it to ComfyUI's patch signatures.
Every object stored in ``model_options`` returns itself from ``__deepcopy__`` (a ``clone()`` shares it) and
from ``.to()`` (ComfyUI keeps the return value); weights a hook function needs on the sampling device are
a ``ModelPatcher`` that it lists in ``models()`` (:func:`sampling_weights`), so ComfyUI counts them in its
memory estimate, loads them with the model and offloads and frees them with it, as it does for a model patch.

Users: ``intervention_run.py`` (the feature intervention) and ``recorder.py`` (activation capture).
Per-run state is made by an OUTER_SAMPLE wrapper (:class:`RunWrapper`) and put into the run's own copy of
``transformer_options`` under a key unique to the patch, so chained patches never share state and the
input model's options are never touched.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch
from torch import Tensor, nn

from .model_info import HookPoint

INTERVENTION_KEY = "diffbias_intervention"
"""Prefix of the OUTER_SAMPLE wrapper keys and ``transformer_options`` state keys of interventions."""
TXT_TOKENS_KEY = "diffbias_txt_tokens"
"""``transformer_options`` key: number of text tokens in front of the image tokens of a single block."""
TXT_TOKENS_WRAPPER_KEY = "diffbias_txt_tokens"
"""DIFFUSION_MODEL wrapper key of the wrapper that records :data:`TXT_TOKENS_KEY`."""

HookFn = Callable[[Tensor, dict], Tensor]


class SharedPatch:
    """Base of objects stored in model_options: shared by clones; their weights move through ``models()``."""

    def __deepcopy__(self, memo):
        return self

    def to(self, target):
        return self

    def models(self) -> list:
        """ModelPatchers ComfyUI loads, counts and offloads with the model (none by default)."""
        return []


def _models_of(*parts) -> list:
    return [m for part in parts if part is not None and hasattr(part, "models") for m in part.models()]


# ------------------------------------------------------------------------------------------- seams
class _UNetInputPatch(SharedPatch):
    """``input_block_patch`` calling ``fn`` on the output of input block ``index`` (skip and main path)."""

    def __init__(self, index: int, fn: HookFn) -> None:
        self.block = ("input", index)
        self.fn = fn

    def __call__(self, h: Tensor, transformer_options: dict) -> Tensor:
        if transformer_options.get("block") == self.block:
            return self.fn(h, transformer_options)
        return h

    def models(self) -> list:
        return _models_of(self.fn)


class _UNetOutputPatch(_UNetInputPatch):
    """``output_block_patch`` calling ``fn`` on ``h`` entering output block ``index`` (before the skip concat).

    Block 0 sees the middle block's output (h-space); block N+1 sees output block N's output.
    """

    def __init__(self, index: int, fn: HookFn) -> None:
        super().__init__(index, fn)
        self.block = ("output", index)

    def __call__(self, h: Tensor, hsp: Tensor, transformer_options: dict) -> tuple[Tensor, Tensor]:
        if transformer_options.get("block") == self.block:
            h = self.fn(h, transformer_options)
        return h, hsp


class _DitBlockPatch(SharedPatch):
    """``dit`` replace patch: runs the block (or the patch it replaced), then ``fn`` on the image tokens."""

    def __init__(self, single: bool, fn: HookFn, previous=None) -> None:
        self.single = single
        self.fn = fn
        self.previous = previous

    def __call__(self, args: dict, extra: dict) -> dict:
        transformer_options = args.get("transformer_options")
        if transformer_options is None:  # without it the rows' cond/uncond kinds and classes are unknown
            raise RuntimeError(
                "diffbias: this model calls its DiT block patches without transformer_options, so the edit "
                "cannot tell the conditional rows of a batch from the unconditional ones; this model "
                "family is not supported"
            )
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        img = out["img"]
        if not self.single:
            return {**out, "img": self.fn(img, transformer_options)}
        txt = transformer_options.get(TXT_TOKENS_KEY)
        if txt is None:
            raise RuntimeError(
                "diffbias: the single-block patch did not get the text token count; "
                "this model family does not put text tokens first in its single blocks"
            )
        edited = self.fn(img[:, txt:], transformer_options)  # (B, T_img, C): text tokens come first
        return {**out, "img": torch.cat([img[:, :txt], edited], dim=1)}

    def to(self, target):
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous = self.previous.to(target)
        return self

    def models(self) -> list:
        return _models_of(self.fn, self.previous)


def _record_txt_tokens(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: note how many text tokens lead the single blocks' sequence."""
    transformer_options = kwargs.get("transformer_options")
    if transformer_options is None:
        transformer_options = next((a for a in reversed(args) if isinstance(a, dict)), None)
    context = kwargs.get("context", args[2] if len(args) > 2 else None)
    if transformer_options is not None and isinstance(context, Tensor):
        transformer_options[TXT_TOKENS_KEY] = context.shape[1]
    return executor(*args, **kwargs)


def install(model, hook: HookPoint, fn: HookFn) -> None:
    """Install ``fn`` at ``hook`` on ``model`` (a ModelPatcher clone; the caller checked the hook exists)."""
    if hook.stage == "middle":
        model.set_model_output_block_patch(_UNetOutputPatch(0, fn))
    elif hook.stage == "input":
        model.set_model_input_block_patch(_UNetInputPatch(hook.index, fn))
    elif hook.stage == "output":
        model.set_model_output_block_patch(_UNetOutputPatch(hook.index + 1, fn))
    else:
        block = ("double_block" if hook.stage == "double" else "single_block", hook.index)
        previous = (
            model.model_options["transformer_options"].get("patches_replace", {}).get("dit", {}).get(block)
        )
        patch = _DitBlockPatch(hook.stage == "single", fn, previous)
        model.set_model_patch_replace(patch, "dit", block[0], block[1])
        wrappers = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
        if hook.stage == "single" and not model.get_wrappers(wrappers, TXT_TOKENS_WRAPPER_KEY):
            model.add_wrapper_with_key(wrappers, TXT_TOKENS_WRAPPER_KEY, _record_txt_tokens)


# ------------------------------------------------------------------------------------- batch layout
def chunk_kinds(transformer_options: dict) -> list[int]:
    """Per chunk of the model batch: 0 = conditional (positive), 1 = anything else (negative, extra conds).

    ``cond_or_uncond`` lists the chunks in the order they are stacked; chunk i is rows
    ``[i*per, (i+1)*per)`` with ``per = batch // len(chunks)``, and every chunk holds the same images in order.
    """
    return [0 if c == 0 else 1 for c in transformer_options.get("cond_or_uncond") or [0]]


def chosen_chunks(transformer_options: dict, batch: int, cond_only: bool) -> tuple[list[int], int, int]:
    """(indices of the chunks to use, number of chunks, rows per chunk) of a model batch of ``batch`` rows.

    ``cond_only``: the conditional chunks only; else all. ValueError when the batch does not split evenly.
    """
    kinds = chunk_kinds(transformer_options)
    if batch % len(kinds) != 0:
        raise ValueError(f"a batch of {batch} rows does not split into {len(kinds)} equal chunks ({kinds})")
    chosen = [i for i, kind in enumerate(kinds) if kind == 0 or not cond_only]
    return chosen, len(kinds), batch // len(kinds)


def row_classes(image_class: Tensor, chunks: int, batch: int) -> Tensor:
    """(batch,) class per row of ``chunks`` stacked copies of the images whose classes are image_class (n,)."""
    if image_class.shape[0] * chunks != batch:
        raise ValueError(
            f"{chunks} chunks of the batch of {batch} hold {batch // max(chunks, 1)} rows each, but classes were "
            f"assigned to {image_class.shape[0]} images"
        )
    return image_class.to(torch.int64).repeat(chunks)


def row_sigmas(transformer_options: dict, batch: int) -> Tensor | None:
    """(batch,) sigma of every row of the model batch, or None when the sampler did not say."""
    sigmas = transformer_options.get("sigmas")
    if not isinstance(sigmas, Tensor):
        return None
    sigmas = sigmas.reshape(-1)  # (per,) one sigma per image, or (1,)
    return sigmas.repeat(batch // sigmas.numel()) if batch % sigmas.numel() == 0 else None


def step_index(transformer_options: dict, sigma: Tensor) -> int:
    """Sampling step of ``sigma`` (a scalar tensor) in this run's schedule; 0 when unknown. Syncs."""
    schedule = transformer_options.get("sample_sigmas")
    if not isinstance(schedule, Tensor) or schedule.numel() == 0:
        return 0
    return int((schedule.to(sigma.device, torch.float32) - sigma.float()).abs().argmin())


# -------------------------------------------------------------------------------- weights and runs
def sampling_weights(module: nn.Module) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher for ``module`` (weights a patch needs while sampling): ComfyUI loads it to the sampling
    device with the model when a patch lists it in ``models()``, counts its size, and offloads it with the
    model. It moves ``module`` in place: give it a module no one else holds."""
    return comfy.model_patcher.ModelPatcher(
        module,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def compute_dtype(model) -> torch.dtype:
    """The dtype ``model`` computes its activations in (its weights' dtype, or the manual-cast dtype)."""
    cast = getattr(model.model, "manual_cast_dtype", None)
    return cast if cast is not None else model.model_dtype()


def wrapper_count(model, prefix: str) -> int:
    """How many OUTER_SAMPLE wrappers with keys starting with ``prefix`` ``model`` carries."""
    keys = model.wrappers.get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {})
    return sum(1 for key in keys if isinstance(key, str) and key.startswith(prefix))


def add_run_wrapper(model, key: str, wrapper) -> None:
    """Install ``wrapper`` (a :class:`RunWrapper`) as the OUTER_SAMPLE wrapper ``key`` of ``model``."""
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, wrapper)


class RunWrapper:
    """OUTER_SAMPLE wrapper: ``start(num_images, seed, model_sampling)`` makes a run's state, which is put into
    the run's ``transformer_options`` under ``state_key`` while it samples and removed afterwards.

    Arguments after ``seed`` are handed to ``executor`` as they came: ComfyUI 0.3.64 passes none, newer
    ComfyUI passes ``latent_shapes=`` (see docs/comfyui-compat.md).
    """

    state_key: str

    def start(self, num_images: int, seed: int | None, model_sampling):
        raise NotImplementedError

    def __call__(
        self,
        executor,
        noise,
        latent_image,
        sampler,
        sigmas,
        denoise_mask=None,
        callback=None,
        disable_pbar=False,
        seed=None,
        **later,
    ):
        guider = executor.class_obj
        state = self.start(noise.shape[0], seed, guider.model_patcher.get_model_object("model_sampling"))
        options = guider.model_options.setdefault("transformer_options", {})
        options[self.state_key] = state
        try:
            return executor(
                noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, **later
            )
        finally:
            options.pop(self.state_key, None)


_MOVED = {
    name: "intervention_run"
    for name in (
        "ClassPlan",
        "FeatureEdit",
        "InterventionWrapper",
        "RunState",
        "add_intervention",
        "derive_seed",
        "intervention_count",
    )
}
_MOVED.update({name: "recorder" for name in ("Captured", "Recorder", "add_recorder")})


def __getattr__(name: str):
    """The intervention and the recorder moved to their own modules; scripts that import them from here still
    work."""
    if name in _MOVED:
        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "INTERVENTION_KEY",
    "TXT_TOKENS_KEY",
    "RunWrapper",
    "SharedPatch",
    "add_run_wrapper",
    "chosen_chunks",
    "chunk_kinds",
    "compute_dtype",
    "install",
    "row_classes",
    "row_sigmas",
    "sampling_weights",
    "step_index",
    "wrapper_count",
]
