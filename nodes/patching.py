"""The one module that knows ComfyUI's transformer_options, patch names and wrapper keys.

Two kinds of hook functions are installed at a hook point (see ``model_info.HookPoint``):

* :class:`FeatureEdit` changes the SAE features of a target class per image (the intervention);
* :class:`Recorder` hands the activation to a sink and returns it unchanged (training, attribution).

A hook function is called as ``fn(h, transformer_options)`` with ``h`` the hooked activation,
(B, C, H, W) for a UNet block or (B, T, C) image tokens for a DiT block, and returns it (edited).
The seam objects below adapt it to ComfyUI's patch signatures. Every object stored in
``model_options`` returns itself from ``__deepcopy__`` (a ``clone()`` shares it, SAE weights are never
copied) and from ``.to()`` (ComfyUI keeps the return value).

Per-run state (the class of every image) is made by an OUTER_SAMPLE wrapper from the sampler's seed and
put into the run's own copy of ``transformer_options`` under a key unique to the patch, so chained
interventions never share state, and the input model's options are never touched.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import comfy.patcher_extension
import torch
from torch import Tensor

from ..diffbias_core.intervene.intervention import (
    KEEP,
    EditSpec,
    apply_edit,
    assign_classes,
    edit_map,
    feature_table,
    rows_for_images,
)
from ..diffbias_core.sae.model import SparseAutoencoder
from .model_info import HookPoint

logger = logging.getLogger(__name__)

INTERVENTION_KEY = "diffbias_intervention"
"""Prefix of the OUTER_SAMPLE wrapper keys and ``transformer_options`` state keys of interventions."""
TXT_TOKENS_KEY = "diffbias_txt_tokens"
"""``transformer_options`` key: number of text tokens in front of the image tokens of a single block."""
TXT_TOKENS_WRAPPER_KEY = "diffbias_txt_tokens"
"""DIFFUSION_MODEL wrapper key of the wrapper that records :data:`TXT_TOKENS_KEY`."""

HookFn = Callable[[Tensor, dict], Tensor]
_SAE_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


class _SharedPatch:
    """Base of objects stored in model_options: shared by clones, moved in place by ComfyUI."""

    def __deepcopy__(self, memo):
        return self

    def to(self, target):
        return self


# ------------------------------------------------------------------------------------------- seams
class _UNetInputPatch(_SharedPatch):
    """``input_block_patch`` calling ``fn`` on the output of input block ``index`` (skip and main path)."""

    def __init__(self, index: int, fn: HookFn) -> None:
        self.block = ("input", index)
        self.fn = fn

    def __call__(self, h: Tensor, transformer_options: dict) -> Tensor:
        if transformer_options.get("block") == self.block:
            return self.fn(h, transformer_options)
        return h

    def to(self, target):
        self.fn = self.fn.to(target) if hasattr(self.fn, "to") else self.fn
        return self


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


class _DitBlockPatch(_SharedPatch):
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
        if hasattr(self.fn, "to"):
            self.fn = self.fn.to(target)
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous = self.previous.to(target)
        return self


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
    """Per chunk of the model batch: 0 = conditional (positive), 1 = anything else (negative, extra conds)."""
    return [0 if c == 0 else 1 for c in transformer_options.get("cond_or_uncond") or [0]]


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


# --------------------------------------------------------------------------------------- recording
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


class Recorder(_SharedPatch):
    """A hook function that passes the activation of the conditional rows to ``sink`` and changes nothing."""

    def __init__(self, sink: Callable[[Captured], None], cond_only: bool = True) -> None:
        self.sink = sink
        self.cond_only = cond_only

    def __call__(self, h: Tensor, transformer_options: dict) -> Tensor:
        kinds = chunk_kinds(transformer_options)
        per = h.shape[0] // len(kinds)
        rows = [
            i * per + j for i, kind in enumerate(kinds) if kind == 0 or not self.cond_only for j in range(per)
        ]
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


# ------------------------------------------------------------------------------------ intervention
class ClassPlan(NamedTuple):
    """How every image of a run gets its target class."""

    weights: tuple[float, ...]
    """Target proportions per class (stratified assignment), used when ``fixed`` is None."""
    fixed: int | None
    """One class for every image (a class index, or ``SUPPRESS``), or None to draw by ``weights``."""
    seed: int
    """The node's seed, mixed with the sampler's seed and ``salt``."""
    salt: str
    """Distinguishes chained interventions so that their assignments are independent."""

    def classes(self, num_images: int, sampler_seed: int | None) -> Tensor:
        """(num_images,) int64 target class per image, a function of the sampler's seed."""
        if self.fixed is not None:
            return torch.full((num_images,), self.fixed, dtype=torch.int64)
        return assign_classes(num_images, self.weights, derive_seed(sampler_seed, self.seed, self.salt))


def derive_seed(sampler_seed: int | None, node_seed: int, salt: str) -> int:
    """A 63-bit seed from the sampler's seed, the node's seed and a salt (independent per salt)."""
    text = f"{sampler_seed}:{node_seed}:{salt}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


class RunState:
    """Per sampling run: the target class per image and the active sigma window."""

    def __init__(self, image_class: Tensor, sigma_high: float, sigma_low: float) -> None:
        self.image_class = image_class  # (n,) int64 on the CPU
        self.sigma_high = sigma_high
        self.sigma_low = sigma_low
        self._on: dict[torch.device, Tensor] = {}

    def image_class_on(self, device: torch.device) -> Tensor:
        """(n,) image classes on ``device`` (copied once per run and device)."""
        if device not in self._on:
            self._on[device] = self.image_class.to(device)
        return self._on[device]


def _sae_on(sae: SparseAutoencoder, device: torch.device, dtype: torch.dtype) -> SparseAutoencoder:
    """``sae`` itself if it already lives on device/dtype, else a new SAE holding moved copies of its weights.

    The source SAE is never changed: it is the value of a DIFFBIAS_SAE wire that other nodes share.
    """
    if sae.device == device and sae.dtype == dtype:
        return sae
    weights = (getattr(sae, name).detach().to(device=device, dtype=dtype) for name in _SAE_WEIGHTS)
    return SparseAutoencoder.from_weights(
        *weights, sae.k, hook=sae.hook, model_family=sae.model_family, provenance=sae.provenance
    )


class FeatureEdit(_SharedPatch):
    """The intervention hook function: edits the features of each row's target class.

    Row classes come from the :class:`RunState` that :class:`InterventionWrapper` put under
    ``state_key``; unconditional chunks (``cond_only``) are not even encoded, and rows outside the sigma
    window are left bit for bit.
    """

    def __init__(
        self,
        sae,
        features,
        spec: EditSpec,
        state_key: str,
        plan: ClassPlan,
        cond_only: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.sae = sae
        self.features = features
        self.spec = spec
        self.state_key = state_key
        self.plan = plan
        self.cond_only = cond_only
        self.compute_dtype = compute_dtype
        self._dtype: torch.dtype | None = compute_dtype
        self._work: tuple[torch.device, torch.dtype, torch.nn.Module, object] | None = None

    def to(self, target):
        if isinstance(target, torch.dtype):
            if self.compute_dtype is None and target != self._dtype:
                self._dtype = target
                self._work = None
        else:
            device = torch.device(target)
            if self._work is not None and self._work[0] != device:
                self._work = None  # frees the copy on the old device; rebuilt on the next call
        return self

    def _working(self, device: torch.device, dtype: torch.dtype):
        work = self._work
        if work is None or work[0] != device or work[1] != dtype:
            sae = _sae_on(self.sae, device, dtype)
            work = (device, dtype, sae, feature_table(self.features, self.spec.top_k, device))
            self._work = work
        return work[2], work[3]

    def __call__(self, h: Tensor, transformer_options: dict) -> Tensor:
        kinds = chunk_kinds(transformer_options)
        per = h.shape[0] // len(kinds)
        edited = [i for i, kind in enumerate(kinds) if kind == 0 or not self.cond_only]
        if not edited:  # only unconditional chunks in this call: nothing to do, nothing to encode
            return h
        if len(edited) == len(kinds):
            return self._edit(h, len(kinds), transformer_options)
        chunks = list(h.split(per))  # (per, ...) views; the chunks not edited are copied back as they are
        done = self._edit(torch.cat([chunks[i] for i in edited]), len(edited), transformer_options)
        for j, i in enumerate(edited):
            chunks[i] = done[j * per : (j + 1) * per]
        return torch.cat(chunks)

    def _edit(self, h: Tensor, chunks: int, transformer_options: dict) -> Tensor:
        """Edit every row of h: ``chunks`` stacked copies of the run's images."""
        per = h.shape[0] // chunks
        state = transformer_options.get(self.state_key)
        if state is None:  # sampled without a guider run (no OUTER_SAMPLE): classes from the node's seed
            state = RunState(self.plan.classes(per, None), float("inf"), float("-inf"))
        sae, table = self._working(h.device, self._dtype or h.dtype)
        rows = rows_for_images(state.image_class_on(h.device), [0] * chunks, h.shape[0], False)  # (B,)
        sigmas = row_sigmas(transformer_options, h.shape[0])
        if sigmas is not None:
            active = (sigmas <= state.sigma_high) & (sigmas >= state.sigma_low)  # (B,)
            rows = rows.masked_fill(~active.to(rows.device), KEEP)
        if h.ndim == 4:
            return edit_map(h, sae, table, rows, self.spec)
        return apply_edit(h, sae, table, rows, self.spec)


class InterventionWrapper:
    """OUTER_SAMPLE wrapper: draws the image classes of one run from its seed; removes them afterwards.

    Arguments after ``seed`` are handed to ``executor`` as they came: ComfyUI 0.3.64 passes none, newer
    ComfyUI passes ``latent_shapes=`` (see docs/comfyui-compat.md).
    """

    def __init__(self, state_key: str, plan: ClassPlan, start_percent: float, end_percent: float) -> None:
        self.state_key = state_key
        self.plan = plan
        self.start_percent = start_percent
        self.end_percent = end_percent

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
        sampling = guider.model_patcher.get_model_object("model_sampling")
        state = RunState(
            self.plan.classes(noise.shape[0], seed),
            float(sampling.percent_to_sigma(self.start_percent)),
            float(sampling.percent_to_sigma(self.end_percent)),
        )
        options = guider.model_options.setdefault("transformer_options", {})
        options[self.state_key] = state
        logger.debug("diffbias: %s image classes %s", self.state_key, state.image_class.tolist())
        try:
            return executor(
                noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, **later
            )
        finally:
            options.pop(self.state_key, None)


def intervention_count(model) -> int:
    """How many diffbias interventions ``model`` carries already (the next one's ordinal)."""
    keys = model.wrappers.get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {})
    return sum(1 for key in keys if isinstance(key, str) and key.startswith(INTERVENTION_KEY))


def add_intervention(
    model,
    hook: HookPoint,
    sae,
    features,
    spec: EditSpec,
    *,
    weights: Sequence[float],
    fixed: int | None,
    seed: int,
    window: tuple[float, float],
    cond_only: bool,
):
    """A clone of ``model`` with the feature intervention installed at ``hook`` (``model`` is unchanged).

    window: (start_percent, end_percent) of the schedule in which the edit acts.
    """
    clone = model.clone()
    ordinal = intervention_count(model)
    key = f"{INTERVENTION_KEY}_{ordinal}"
    plan = ClassPlan(tuple(weights), fixed, int(seed), f"{ordinal}:{','.join(features.classes)}")
    install(clone, hook, FeatureEdit(sae, features, spec, key, plan, cond_only=cond_only))
    clone.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE,
        key,
        InterventionWrapper(key, plan, window[0], window[1]),
    )
    return clone


def add_recorder(model, hook: HookPoint, sink: Callable[[Captured], None], cond_only: bool = True):
    """A clone of ``model`` that hands the activations at ``hook`` to ``sink`` while it samples."""
    clone = model.clone()
    install(clone, hook, Recorder(sink, cond_only))
    return clone


__all__ = [
    "INTERVENTION_KEY",
    "TXT_TOKENS_KEY",
    "Captured",
    "ClassPlan",
    "FeatureEdit",
    "InterventionWrapper",
    "Recorder",
    "RunState",
    "add_intervention",
    "add_recorder",
    "derive_seed",
    "install",
]
