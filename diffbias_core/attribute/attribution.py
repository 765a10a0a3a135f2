"""Which SAE latents carry a class: integrated gradients through per-step probes, and two controls.

``ig`` (DiffLens): for every labelled activation x of class c at step t, with latents z and a baseline
z0 (``paired``: the mean latents of the other classes' activations from the same initial noise at the
same step; ``zero``), the probe's target probability f = softmax(probe_t(map) / T)[c] is integrated
along z(a) = z0 + a (z - z0), a in (0, 1], with the m midpoint points evaluated in one batched pass.
The probe sees the map rebuilt from the interpolated latents *plus the reconstruction error*, itself
interpolated from the baseline's error to x's (constant for the zero baseline): at a = 1 the probe sees
x exactly and, for the paired baseline, at a = 0 the partner activation exactly, so the path runs
between real activations the probe was trained on instead of SAE reconstructions, which a probe can
classify differently (the SAE misses part of every activation). Completeness then reads

    sum_j IG_j + IG_error = f(x) - f(baseline),     IG_j = (z - z0)_j * mean_a df/dz_j(a)

and the error's share is reported in the provenance. A latent's score for class c is DiffLens'
sum over steps, samples and positions of mean_a df/dz_j * |z - z0|_j: positive when the latent, where
it differs from the baseline, raises the class probability. (Summing |IG_j| instead would also rank the
*other* class's latents, which the paired baseline removes, for class c.)

``mean-diff``: mean latent activation on class c minus the mean of the other classes' means (no probes).
``random``: a seeded random choice of latents of the same size, the control.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ..base.grad_mode import trainable
from ..base.progress import check_stop
from ..dissect.activations import ActivationBatch, ActivationSource
from ..sae.model import SparseAutoencoder
from .features import FeatureSet
from .probes import StepProbes, check_chance

_ELEMENTS = 1 << 23  # interpolated values per batched IG pass (about 32 MB in float32)


@dataclass(frozen=True)
class AttributionConfig:
    """How features are ranked."""

    method: Literal["ig", "mean-diff", "random"] = "ig"
    """Integrated gradients through the probes, the mean-difference ranking, or the random control."""
    baseline: Literal["paired", "zero"] = "paired"
    """IG baseline: the other classes' latents from the same noise and step, or zero latents."""
    top_k: int = 100
    """Features kept per class (>= 1; fewer when the SAE has fewer latents)."""
    points: int = 16
    """IG interpolation points m (midpoint rule, >= 1)."""
    temperature: float = 1000.0
    """Softmax temperature T of the probe's class probability (DiffLens SD: 1000), > 0."""
    seed: int = 0
    """Seed of the random control."""

    def __post_init__(self) -> None:
        if self.method not in ("ig", "mean-diff", "random"):
            raise ValueError(
                f"AttributionConfig.method must be 'ig', 'mean-diff' or 'random', got {self.method!r}"
            )
        if self.baseline not in ("paired", "zero"):
            raise ValueError(f"AttributionConfig.baseline must be 'paired' or 'zero', got {self.baseline!r}")
        for name in ("top_k", "points"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"AttributionConfig.{name} must be a positive integer, got {getattr(self, name)!r}"
                )
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"AttributionConfig.temperature must be > 0, got {self.temperature!r}")


class IGResult(NamedTuple):
    """Integrated gradients of a batch of activations (all tensors lead with the batch dim B).

    latents: (B, L) signed IG per latent, summed over positions. error: (B,) IG of the reconstruction-error
    path. score: (B, L) DiffLens score mean_a df/dz * |dz|, summed over positions. f_actual, f_baseline:
    (B,) target probability at the activation and at the baseline.
    """

    latents: Tensor
    error: Tensor
    score: Tensor
    f_actual: Tensor
    f_baseline: Tensor


def _rows(sae: SparseAutoencoder, acts: Tensor) -> Tensor:
    """Activations (B, d_in) or (B, C, H, W) -> SAE rows (B, P, n_in)."""
    return acts.reshape(acts.shape[0], 1, -1) if acts.ndim == 2 else sae.map_to_inputs(acts)


def _acts(sae: SparseAutoencoder, rows: Tensor, row_shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`_rows`: (B, P, n_in) -> (B, *row_shape)."""
    if len(row_shape) == 1:
        return rows.reshape(rows.shape[0], *row_shape)
    return sae.inputs_to_map(rows, row_shape[1], row_shape[2])


def integrated_gradients(sae: SparseAutoencoder, probes: StepProbes, acts: Tensor, target: Tensor, step: int,
                         config: AttributionConfig, base: tuple[Tensor, Tensor] | None = None) -> IGResult:  # fmt: skip
    """IG of the probe's target probability w.r.t. the SAE latents of ``acts`` (B, *row_shape).

    target: (B,) class index per activation. base: (partner activations (B, G, *row_shape), weights (B, G)
    summing to 1 per row) whose weighted mean latents and error are the baseline; None: the zero baseline
    (the error stays x's). Works inside ``torch.inference_mode()``.
    """
    with torch.inference_mode(False), torch.no_grad():  # leaves inference mode (a ComfyUI node) for autograd
        base = None if base is None else (base[0].clone(), base[1].clone())
        return _integrated_gradients(sae, probes, acts.clone(), target.clone(), step, config, base)


def _integrated_gradients(sae, probes, acts, target, step, config, base) -> IGResult:
    rows = _rows(sae, acts).to(sae.dtype)  # (B, P, n)
    b, p, n = rows.shape
    code = sae.encode(rows)
    error = rows - sae.decode(code)  # (B, P, n)
    if base is None:
        base_idx = code.indices[..., :0]
        base_val = code.values[..., :0]
        base_error = error
    else:
        base_acts, share = base[0], base[1].to(rows.dtype)
        g = base_acts.shape[1]
        base_rows = _rows(sae, base_acts.flatten(0, 1)).to(sae.dtype).reshape(b, g, p, n)  # (B, G, P, n)
        base_code = sae.encode(base_rows)
        base_error = ((base_rows - sae.decode(base_code)) * share[:, :, None, None]).sum(1)  # (B, P, n)
        weighted = base_code.values * share[:, :, None, None]  # (B, G, P, k)
        base_idx = base_code.indices.permute(0, 2, 1, 3).reshape(b, p, -1)  # (B, P, G*k)
        base_val = weighted.permute(0, 2, 1, 3).reshape(b, p, -1)
    m = config.points
    alpha = (torch.arange(m, device=rows.device, dtype=rows.dtype) + 0.5) / m  # midpoints
    a = alpha.view(m, 1, 1, 1)
    indices = torch.cat([code.indices, base_idx], -1).expand(m, -1, -1, -1)  # (m, B, P, K2)
    weights = torch.cat([a * code.values, (1 - a) * base_val.expand(m, -1, -1, -1)], -1)  # (m, B, P, K2)
    offsets = base_error + a * (error - base_error)  # (m, B, P, n)
    weights, offsets = weights.detach().requires_grad_(), offsets.detach().requires_grad_()
    with torch.enable_grad():
        x = sae.decode_sparse(indices, weights) + sae.b_dec_flat + offsets  # (m, B, P, n)
        maps = _acts(sae, x.reshape(m * b, p, n), probes.row_shape)  # (m*B, *row_shape)
        prob = (probes.logits(maps, step) / config.temperature).softmax(-1)  # (m*B, classes)
        objective = prob.gather(1, target.repeat(m)[:, None]).sum()
        grad_w, grad_offsets = torch.autograd.grad(objective, [weights, offsets])  # no .grad left on the SAE
    grad_w = grad_w.mean(0)  # (B, P, K2): mean_a df/dz at each entry's latent
    error_ig = (grad_offsets.mean(0) * (error - base_error)).sum((1, 2))  # (B,)
    k = code.indices.shape[-1]
    latents = sae.num_latents
    delta = torch.zeros(b * p, latents, dtype=rows.dtype, device=rows.device)  # (B*P, L)
    delta.scatter_add_(1, code.indices.reshape(b * p, k), code.values.reshape(b * p, k))
    delta.scatter_add_(1, base_idx.reshape(b * p, -1), -base_val.reshape(b * p, -1))
    grad = torch.zeros_like(delta).scatter_(1, indices[0].reshape(b * p, -1), grad_w.reshape(b * p, -1))
    ends = torch.stack([error + sae.decode(code), base_error + sae.decode_sparse(base_idx, base_val)
                        + sae.b_dec_flat])  # (2, B, P, n): x and the baseline  # fmt: skip
    f = probes.logits(_acts(sae, ends.reshape(2 * b, p, n), probes.row_shape), step) / config.temperature
    f = f.softmax(-1).gather(1, target.repeat(2)[:, None]).reshape(2, b)
    return IGResult((grad * delta).reshape(b, p, latents).sum(1), error_ig,
                    (grad * delta.abs()).reshape(b, p, latents).sum(1), f[0], f[1])  # fmt: skip


def _partners(batch: ActivationBatch, step: int, classes: tuple[str, ...]) -> Tensor:
    """(N, G) row index of every activation's other-class partners (same sample id); -1 pads."""
    partners = []
    for i in range(batch.num_rows):
        mine = (batch.sample == batch.sample[i]) & (batch.label != batch.label[i]) & (batch.label >= 0)
        found = torch.nonzero(mine).flatten()
        if not found.numel():
            raise ValueError(
                f"step {step}: the {classes[int(batch.label[i])]!r} activation of sample {int(batch.sample[i])} has "
                "no activation of another class from the same initial noise; the paired baseline needs them "
                "(use the zero baseline)"
            )
        partners.append(found)
    return torch.nn.utils.rnn.pad_sequence(partners, batch_first=True, padding_value=-1)


def ig_scores(sae: SparseAutoencoder, probes: StepProbes, source: ActivationSource, config: AttributionConfig,
              progress: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[Tensor, dict[str, str]]:  # fmt: skip
    """(classes, L) summed DiffLens scores per class, and facts for the provenance."""
    classes = source.classes
    scores = torch.zeros(len(classes), sae.num_latents, dtype=torch.float64)
    latent_ig = error_ig = 0.0
    steps = source.steps()
    for done, step in enumerate(steps):
        batch = source.select_step(step)
        batch = batch.select(batch.label >= 0)
        partners = _partners(batch, step, classes) if config.baseline == "paired" else None
        per_row = config.points * math.prod(source.row_shape)
        chunk = max(1, _ELEMENTS // max(1, per_row * (1 if partners is None else partners.shape[1])))
        for start in range(0, batch.num_rows, chunk):
            check_stop(should_stop)
            part = slice(start, start + chunk)
            acts = batch.activations[part].to(sae.device, sae.dtype)
            base = None
            if partners is not None:  # pads point at a real partner with weight 0
                rows = partners[part]
                share = (rows >= 0).to(sae.dtype)
                share = (share / share.sum(1, keepdim=True)).to(sae.device)  # (b, G)
                rows = torch.where(rows >= 0, rows, rows[:, :1])
                base = (batch.activations[rows].to(sae.device, sae.dtype), share)  # (b, G, *row_shape)
            result = integrated_gradients(
                sae, probes, acts, batch.label[part].to(sae.device), step, config, base
            )
            scores.index_add_(0, batch.label[part].to(scores.device), result.score.double().cpu())
            latent_ig += float(result.latents.abs().sum())
            error_ig += float(result.error.abs().sum())
        if progress is not None:
            progress(done + 1, len(steps))
    share = error_ig / max(latent_ig + error_ig, 1e-30)
    return scores, {"error_share": f"{share:.4g}", "points": str(config.points),
                    "temperature": f"{config.temperature:g}", "baseline": config.baseline}  # fmt: skip


def mean_diff_scores(sae: SparseAutoencoder, source: ActivationSource,
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> Tensor:  # fmt: skip
    """(classes, L): mean latent activation (over activations and positions) of each class minus the mean of
    the other classes' means."""
    classes = len(source.classes)
    sums = torch.zeros(classes, sae.num_latents, dtype=torch.float64)
    counts = torch.zeros(classes, dtype=torch.float64)
    read = max(1, _ELEMENTS // max(1, math.prod(source.row_shape)))
    total = math.ceil(source.num_rows / read)
    with torch.no_grad():
        for done, batch in enumerate(source.iter_batches(read)):
            check_stop(should_stop)
            batch = batch.select(batch.label >= 0)
            code = sae.encode(_rows(sae, batch.activations.to(sae.device)))  # (b, P, k)
            b, p, k = code.indices.shape
            dense = torch.zeros(b, sae.num_latents, dtype=torch.float64, device=code.values.device)
            dense.scatter_add_(
                1, code.indices.reshape(b, p * k), code.values.reshape(b, p * k).double()
            )  # (b, L)
            sums.index_add_(0, batch.label, dense.cpu())
            counts.index_add_(0, batch.label, torch.full((b,), float(p), dtype=torch.float64))
            if progress is not None:
                progress(done + 1, total)
    means = sums / counts[:, None]
    others = (means.sum(0, keepdim=True) - means) / (classes - 1)
    return means - others


def random_scores(num_latents: int, classes: int, seed: int) -> Tensor:
    """(classes, L) seeded random scores: the random-feature control."""
    return torch.rand(
        classes, num_latents, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def check_classes(source: ActivationSource) -> None:
    """Raise ValueError unless the source names >= 2 classes and every class has activations."""
    if len(source.classes) < 2:
        raise ValueError(
            f"attribution needs at least two classes, the activations name {list(source.classes)}"
        )
    counts = torch.bincount(source.column("label").clamp_min(-1) + 1, minlength=len(source.classes) + 1)[1:]
    empty = [name for name, count in zip(source.classes, counts.tolist(), strict=True) if count == 0]
    if empty:
        raise ValueError(
            f"class {empty[0]!r} has no activations (classes {list(source.classes)}); "
            "generate images for every class"
        )


def probe_facts(probes: StepProbes, hook: str) -> dict[str, str]:
    """Provenance entries of the probes' held-out accuracy; ValueError when every probe is at chance.

    ``probe_accuracy``: ``step:accuracy`` per step; ``probe_heldout``: ``step:count``; ``probe_check``:
    the test's outcome in words (see :func:`~.probes.check_chance`).
    """
    check = check_chance(probes)
    steps = probes.steps.tolist()
    accuracy = probes.accuracy.tolist()
    counts = probes.heldout.tolist() if probes.heldout is not None else [0] * len(steps)
    if check.at_chance:
        needed = min(t for t in check.threshold.tolist())
        raise ValueError(
            f"the class prompts do not separate the classes {list(probes.classes)} at hook {hook!r}: the "
            f"probes' held-out accuracy is at chance at every step (best {max(accuracy):.2f}, chance "
            f"{check.chance:.2f}; beating chance at p < {check.alpha} needs {needed:.2f} or more on "
            f"{max(counts)} held-out activations). Use class prompts that differ in the attribute, more "
            "samples, or another hook; no features were ranked"
        )
    above = int(check.above.sum())
    if check.decidable:
        outcome = f"{above} of {len(steps)} steps above chance (p < {check.alpha})"
    else:
        outcome = (f"undecided: too few held-out activations ({min(counts)}) to tell the probes from chance "
                   f"at p < {check.alpha}; use more samples")  # fmt: skip
    return {
        "probe_accuracy": ",".join(f"{s}:{a:.4f}" for s, a in zip(steps, accuracy, strict=True)),
        "probe_heldout": ",".join(f"{s}:{n}" for s, n in zip(steps, counts, strict=True)),
        "probe_check": outcome,
    }


def attribute(sae: SparseAutoencoder, source: ActivationSource, config: AttributionConfig = AttributionConfig(),
              probes: StepProbes | None = None, *,
              progress: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> FeatureSet:  # fmt: skip
    """Rank the SAE's latents per class of ``source`` into a :class:`FeatureSet`.

    ``ig`` needs ``probes`` fitted on the same hook and activation shape (ValueError otherwise).
    progress: called with (units done, units in all). should_stop: polled before every batch of work; True
    raises :class:`~.progress.Cancelled`. Scores are summed over steps, samples, positions. Works inside
    ``torch.inference_mode()`` on an SAE and activations made there (``ig`` copies such an SAE once).
    """
    sae.check_width(source.row_shape[0], "activations")
    if sae.hook != source.hook and "unknown" not in (sae.hook, source.hook):
        raise ValueError(
            f"the SAE was trained on hook {sae.hook!r}, the activations are from hook {source.hook!r}"
        )
    check_classes(source)
    facts = {"method": config.method, "steps": ",".join(map(str, source.steps())),
             "activations": str(source.num_rows)}  # fmt: skip
    if probes is not None:
        facts.update(probe_facts(probes, source.hook))
    if config.method == "ig":
        if probes is None:
            raise ValueError("the 'ig' method needs per-step probes (fit_probes); 'mean-diff' does not")
        probes.check(source.hook, source.row_shape)
        if probes.classes != source.classes:
            raise ValueError(
                f"the probes predict classes {list(probes.classes)}, the activations name "
                f"{list(source.classes)}"
            )
        if sae.W_dec.is_inference():  # loaded in a ComfyUI node: autograd cannot save inference tensors
            with trainable():
                sae = sae.copy_to()
        scores, more = ig_scores(sae, probes, source, config, progress, should_stop)
        facts.update(more)
    elif config.method == "mean-diff":
        scores = mean_diff_scores(sae, source, progress, should_stop)
    else:
        scores = random_scores(sae.num_latents, len(source.classes), config.seed)
        facts["seed"] = str(config.seed)
    top = scores.topk(min(config.top_k, sae.num_latents), dim=1)
    ids = tuple(row.to(torch.int64) for row in top.indices)
    values = tuple(row.to(torch.float32) for row in top.values)
    if config.method == "random":
        values = tuple(torch.zeros_like(v) for v in values)  # the control carries no score
    return FeatureSet(source.classes, ids, values, sae.fingerprint(), sae.hook, config.method, facts)


__all__ = [
    "AttributionConfig",
    "IGResult",
    "attribute",
    "check_classes",
    "probe_facts",
    "ig_scores",
    "integrated_gradients",
    "mean_diff_scores",
    "random_scores",
]
