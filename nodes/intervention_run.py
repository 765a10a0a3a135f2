"""The feature intervention while sampling: one target class per image, the edit applied at the hook.

:func:`add_intervention` installs a :class:`FeatureEdit` at the hook point (``patching.install``) and an
:class:`InterventionWrapper` that draws the images' classes per run. The per-step path of one edit is short:
the seam calls ``FeatureEdit``, which picks the rows and calls the core math once:

* ``add`` with the other classes kept does not depend on the SAE code: one precomputed delta vector per class
  (``intervene.additive``), built from the listed decoder rows only; the encoder is never read.
* every other edit encodes: ``intervene.intervention.apply_edit`` / ``edit_map`` with the SAE in the model's
  compute dtype.

What the edit needs on the sampling device (the SAE copy, or the deltas, and the feature table) is an
:class:`EditWeights` module held by a ComfyUI ModelPatcher (``patching.sampling_weights``) that the edit lists
in ``models()``: ComfyUI counts it in its memory estimate, loads it with the model, offloads and frees it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..diffbias_core.intervene.additive import (
    ClassDeltas,
    add_deltas,
    class_deltas,
    listed_latents,
    needs_encoder,
)
from ..diffbias_core.intervene.intervention import (
    KEEP,
    EditSpec,
    FeatureTable,
    apply_edit,
    assign_classes,
    edit_map,
    feature_table,
)
from ..diffbias_core.sae.lazy import SaeHandle
from ..diffbias_core.sae.model import SparseAutoencoder
from .model_info import HookPoint
from .patching import (
    INTERVENTION_KEY,
    RunWrapper,
    SharedPatch,
    add_run_wrapper,
    chosen_chunks,
    compute_dtype,
    install,
    row_classes,
    row_sigmas,
    sampling_weights,
    wrapper_count,
)

logger = logging.getLogger(__name__)


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


def _frozen(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class _Tables(nn.Module):
    """Leaf module of the small tensors of an edit (a leaf, so ComfyUI's partial loads move it whole)."""

    def __init__(self, table: FeatureTable, deltas: ClassDeltas | None) -> None:
        super().__init__()
        self.ids = _frozen(table.ids)  # (classes, top_k) int64
        self.valid = _frozen(table.valid)  # (classes, top_k) bool
        self.delta = None if deltas is None else _frozen(deltas.delta)  # (classes, n_in) float32
        self.edits = None if deltas is None else _frozen(deltas.edits)  # (classes,) bool


class EditWeights(nn.Module):
    """What one edit reads while sampling: the SAE (encoder edits) or the class deltas (encoder-free ones).

    Owned by the edit's ModelPatcher, which moves it in place; the SAE here is the edit's own module (in the
    compute dtype; its tensors are shared with the loaded SAE when dtype and device already match).
    """

    def __init__(
        self, table: FeatureTable, sae: SparseAutoencoder | None, deltas: ClassDeltas | None
    ) -> None:
        super().__init__()
        self.sae = sae
        self.tables = _Tables(table, deltas)

    @property
    def table(self) -> FeatureTable:
        return FeatureTable(self.tables.ids, self.tables.valid)

    @property
    def deltas(self) -> ClassDeltas:
        return ClassDeltas(self.tables.delta, self.tables.edits)


def edit_weights(
    handle: SaeHandle,
    features,
    spec: EditSpec,
    dtype: torch.dtype,
    fixed: int | None,
    encoder: bool | None = None,
) -> EditWeights:
    """The :class:`EditWeights` of ``spec``: decoder rows only when it needs no encoder, else the whole SAE.

    encoder: None decides by ``needs_encoder``; True forces the encoder path (the reference an encoder-free
    edit equals, for tests and benchmarks); False is refused for an edit that needs the encoder.
    """
    table = feature_table(features, spec.top_k)
    needed = needs_encoder(spec, None if fixed is None else torch.tensor([fixed]))
    if encoder is False and needed:
        raise ValueError(f"the edit {spec} (fixed class {fixed}) reads the SAE code: it needs the encoder")
    if not (needed or encoder):
        latents = listed_latents(table)
        rows = handle.decoder_rows(latents).to(dtype)  # (U, n_in): the SAE in the model's dtype, as below
        return EditWeights(table, None, class_deltas(rows, latents, table, spec))
    sae = handle.load()
    if sae.dtype != dtype:
        copy = sae.copy_to(dtype=dtype)  # the model's compute dtype, as the edit computes in the SAE's dtype
    else:  # a module of its own over the same tensors: ComfyUI moves it in place, the wire's SAE stays put
        weights = (getattr(sae, name).detach() for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
        copy = SparseAutoencoder.from_weights(
            *weights, sae.k, hook=sae.hook, model_family=sae.model_family, provenance=sae.provenance
        )
    return EditWeights(table, copy, None)


class FeatureEdit(SharedPatch):
    """The intervention hook function: edits the features of each row's target class.

    Row classes come from the :class:`RunState` that :class:`InterventionWrapper` put under ``state_key``;
    unconditional chunks (``cond_only``) are not touched, and rows outside the sigma window are left bit for
    bit. ``weights`` is the ModelPatcher of the edit's :class:`EditWeights`.
    """

    def __init__(
        self, weights, spec: EditSpec, state_key: str, plan: ClassPlan, cond_only: bool = True
    ) -> None:
        self.weights = weights
        self.spec = spec
        self.state_key = state_key
        self.plan = plan
        self.cond_only = cond_only

    def models(self) -> list:
        return [self.weights]

    def __call__(self, h: Tensor, transformer_options: dict) -> Tensor:
        chosen, chunks, per = chosen_chunks(transformer_options, h.shape[0], self.cond_only)
        if not chosen:  # only unconditional chunks in this call: nothing to do
            return h
        if len(chosen) == chunks:
            return self._edit(h, chunks, transformer_options)
        parts = list(h.split(per))  # (per, ...) views; the chunks not edited are copied back as they are
        done = self._edit(torch.cat([parts[i] for i in chosen]), len(chosen), transformer_options)
        for j, i in enumerate(chosen):
            parts[i] = done[j * per : (j + 1) * per]
        return torch.cat(parts)

    def _edit(self, h: Tensor, chunks: int, transformer_options: dict) -> Tensor:
        """Edit every row of h: ``chunks`` stacked copies of the run's images."""
        state = transformer_options.get(self.state_key)
        if state is None:  # sampled without a guider run (no OUTER_SAMPLE): classes from the node's seed
            state = RunState(self.plan.classes(h.shape[0] // chunks, None), float("inf"), float("-inf"))
        rows = row_classes(state.image_class_on(h.device), chunks, h.shape[0])  # (B,)
        sigmas = row_sigmas(transformer_options, h.shape[0])
        if sigmas is not None:
            active = (sigmas <= state.sigma_high) & (sigmas >= state.sigma_low)  # (B,)
            rows = rows.masked_fill(~active.to(rows.device), KEEP)
        weights: EditWeights = self.weights.model
        if weights.sae is None:
            return add_deltas(h, weights.deltas, rows)
        if h.ndim == 4:
            return edit_map(h, weights.sae, weights.table, rows, self.spec)
        return apply_edit(h, weights.sae, weights.table, rows, self.spec)


class InterventionWrapper(RunWrapper):
    """OUTER_SAMPLE wrapper: draws the image classes of one run from its seed (see ``patching.RunWrapper``)."""

    def __init__(self, state_key: str, plan: ClassPlan, start_percent: float, end_percent: float) -> None:
        self.state_key = state_key
        self.plan = plan
        self.start_percent = start_percent
        self.end_percent = end_percent

    def start(self, num_images: int, seed: int | None, model_sampling) -> RunState:
        state = RunState(
            self.plan.classes(num_images, seed),
            float(model_sampling.percent_to_sigma(self.start_percent)),
            float(model_sampling.percent_to_sigma(self.end_percent)),
        )
        logger.debug("diffbias: %s image classes %s", self.state_key, state.image_class.tolist())
        return state


def intervention_count(model) -> int:
    """How many diffbias interventions ``model`` carries already (the next one's ordinal)."""
    return wrapper_count(model, INTERVENTION_KEY)


def add_intervention(
    model,
    hook: HookPoint,
    sae: SparseAutoencoder | SaeHandle,
    features,
    spec: EditSpec,
    *,
    weights: Sequence[float],
    fixed: int | None,
    seed: int,
    window: tuple[float, float],
    cond_only: bool,
    encoder: bool | None = None,
):
    """A clone of ``model`` with the feature intervention installed at ``hook`` (``model`` is unchanged).

    sae: the SAE, or a handle on its file (an encoder-free edit then reads only the listed decoder rows).
    window: (start_percent, end_percent) of the schedule in which the edit acts.
    encoder: see :func:`edit_weights` (None: the encoder only when the edit needs it).
    """
    handle = sae if isinstance(sae, SaeHandle) else SaeHandle.of(sae)
    clone = model.clone()
    ordinal = intervention_count(model)
    key = f"{INTERVENTION_KEY}_{ordinal}"
    plan = ClassPlan(tuple(weights), fixed, int(seed), f"{ordinal}:{','.join(features.classes)}")
    patcher = sampling_weights(edit_weights(handle, features, spec, compute_dtype(model), fixed, encoder))
    install(clone, hook, FeatureEdit(patcher, spec, key, plan, cond_only=cond_only))
    add_run_wrapper(clone, key, InterventionWrapper(key, plan, window[0], window[1]))
    return clone


__all__ = [
    "ClassPlan",
    "EditWeights",
    "FeatureEdit",
    "InterventionWrapper",
    "RunState",
    "add_intervention",
    "derive_seed",
    "edit_weights",
    "intervention_count",
]
