"""Did the SAE train? Held-out FVU, the automatic training length and the verdict.

Rules (the numbers are :class:`TrainConfig` fields or the constants below):

* **Held-out rows.** ``TrainConfig.holdout`` (10%) of the sample ids (all rows of one initial noise stay on
  one side, like the probes' split; rows without a pairing are split one by one) never reach the trainer;
  at most ``HOLDOUT_ELEMENTS`` values of them are kept in memory.
* **FVU** of an SAE on rows x (N, n_in) is ``sum |x - x_hat|^2 / sum |x - mean(x)|^2``. It needs at least
  two distinct rows: fewer is an error, not a number (one row has no variance to explain).
* **Automatic length** (``TrainConfig.epochs = None``): passes over the data until at least one pass and
  ``min_steps`` optimizer steps are done, then until the held-out FVU, measured every ``min_steps // 10``
  steps, improved by less than ``plateau`` (relative) or ``FVU_RESOLUTION`` (absolute) over the last
  ``min_steps // 2`` steps (with fewer than ``MIN_JUDGE_ROWS`` held-out rows: right after
  ``min_steps``); at most
  ``STEP_CAP_FACTOR`` times the longer of ``min_steps`` and one pass.
* **Verdict** ``under-trained`` when any of: fewer than ``min_steps`` steps; held-out FVU above
  ``FVU_CEILING``; the held-out FVU still falling by ``plateau`` or more when training ended; fewer rows
  than latents. Warnings that do not change it: dead latents above ``DEAD_CEILING``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .activations import ActivationBatch, make_batch

FVU_CEILING = 0.5
"""Held-out FVU above this (less than half the variance reconstructed) marks the SAE under-trained."""
DEAD_CEILING = 0.5
"""A dead-latent share above this is reported: more than half the dictionary is unused."""
FVU_RESOLUTION = 1e-3
"""Held-out FVU changes smaller than this (0.1% of the variance) count as no improvement."""
STEP_CAP_FACTOR = 5
"""The automatic length stops at this many times max(min_steps, steps of one pass) (runs that settle end
within 1.5-2x min_steps on the planted problems)."""
MIN_JUDGE_ROWS = 64
"""With fewer held-out rows the held-out FVU is too noisy to judge convergence: the automatic length then
stops at max(min_steps, one pass)."""
HOLDOUT_ELEMENTS = 1 << 24
"""At most this many held-out values (rows x n_in) are kept (64 MB in float32)."""
MIN_BATCH, MAX_BATCH, STEPS_PER_PASS = 256, 4096, 32
"""Automatic batch size: rows per pass / STEPS_PER_PASS, clamped to [MIN_BATCH, MAX_BATCH]."""


def auto_batch_size(rows: int) -> int:
    """Rows per optimizer step for ``rows`` training rows per pass.

    At least ``STEPS_PER_PASS`` steps per pass (so small data reaches ``min_steps`` in tens of passes
    rather than hundreds), but never below ``MIN_BATCH`` rows (a noisy gradient) nor above ``MAX_BATCH``
    (sparsify's default batch of tokens per step at this scale).
    """
    return int(min(MAX_BATCH, max(MIN_BATCH, rows // STEPS_PER_PASS)))


def fvu_sums(sae, rows: Tensor, chunk: int = 4096) -> Tensor:
    """(3 + n_in,) float64 sums over rows (N, n_in): |x - x_hat|^2, |x|^2, N, then sum_i x_i (n_in,).

    Sums, not a ratio, so that processes can add theirs before :func:`heldout_fvu` divides.
    """
    err = torch.zeros((), dtype=torch.float64)
    total = torch.zeros(rows.shape[1], dtype=torch.float64)
    square = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, rows.shape[0], chunk):
            x = rows[start : start + chunk].to(sae.device, torch.float32)
            x_hat = sae.decode(sae.encode(x)).float()
            err += (x - x_hat).double().pow(2).sum().cpu()
            total += x.double().sum(0).cpu()
            square += x.double().pow(2).sum().cpu()
    return torch.cat(
        [torch.stack([err, square, torch.tensor(float(rows.shape[0]), dtype=torch.float64)]), total]
    )


def heldout_fvu(sae, rows: Tensor) -> float:
    """FVU of ``sae`` on rows (N, n_in): |x - x_hat|^2 / |x - mean(x)|^2 (this process's rows only).

    Raises ValueError for fewer than two rows or rows without variance, where FVU is not defined.
    """
    sums = fvu_sums(sae, rows) if rows.numel() else torch.zeros(3, dtype=torch.float64)
    err, square, count, total = sums[0], sums[1], sums[2], sums[3:]
    variance = square - total.pow(2).sum() / count.clamp_min(1)  # sum |x - mean|^2
    if float(count) < 2 or not float(variance) > 1e-12 * max(float(square), 1e-30):
        raise ValueError(
            f"FVU needs at least two different rows, got {int(count)} row(s) "
            f"{'without variance' if float(count) >= 2 else ''}".rstrip()
        )
    return float(err / variance)


class Plateau:
    """The held-out FVU over training and the automatic stopping rule.

    window: steps over which the relative improvement is measured. plateau: the improvement below which
    training has converged.
    """

    def __init__(self, window: int, plateau: float) -> None:
        self.window, self.plateau = max(1, window), plateau
        self.history: list[tuple[int, float]] = []

    def add(self, step: int, fvu: float) -> None:
        """Record the held-out FVU measured after ``step`` optimizer steps."""
        self.history.append((step, fvu))

    def improvement(self) -> float | None:
        """Relative held-out FVU drop over the last ``window`` steps (None until that much history)."""
        if not self.history:
            return None
        step, now = self.history[-1]
        earlier = [fvu for s, fvu in self.history if s <= step - self.window]
        if not earlier:
            return None
        then = earlier[-1]
        return (then - now) / then if then > 0 else 0.0

    def converged(self) -> bool:
        """True once the last window improved the held-out FVU by less than ``plateau`` of itself, or by
        less than ``FVU_RESOLUTION`` (0.1% of the variance) in all."""
        gain = self.improvement()
        if gain is None:
            return False
        earlier = [fvu for s, fvu in self.history if s <= self.history[-1][0] - self.window][-1]
        return gain < self.plateau or gain * earlier < FVU_RESOLUTION


class TrainCheck(NamedTuple):
    """What the trained SAE is worth.

    heldout_fvu: FVU of the saved SAE on the held-out rows (NaN when none were held out).
    heldout_rows: their number. fvu_on: ``held-out rows`` or ``training rows`` (too few rows to hold out).
    steps, min_steps: optimizer steps taken and needed. dead_fraction: share of dead latents.
    improvement: relative held-out FVU drop over the last window (None: not measured).
    stopped: why training ended. verdict: ``trained`` or ``under-trained``. reasons: why under-trained.
    warnings: other findings.
    """

    heldout_fvu: float
    heldout_rows: int
    fvu_on: str
    steps: int
    min_steps: int
    dead_fraction: float
    improvement: float | None
    stopped: str
    verdict: str
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when the verdict is ``trained`` and nothing was flagged."""
        return self.verdict == "trained" and not self.warnings

    def summary(self) -> str:
        """One line per finding: the figures, the verdict and what to do."""
        gain = "" if self.improvement is None else f", last window improved it {100 * self.improvement:.1f}%"
        lines = [
            f"FVU {self.heldout_fvu:.4f} on {self.heldout_rows} {self.fvu_on}{gain}; dead latents "
            f"{100 * self.dead_fraction:.1f}%; {self.steps} steps ({self.stopped})",
            f"verdict: {self.verdict}" + (f" ({'; '.join(self.reasons)})" if self.reasons else ""),
        ]
        lines += [f"warning: {text}" for text in self.warnings]
        return "\n".join(lines)


def judge(*, fvu: float, heldout_rows: int, fvu_on: str, steps: int, min_steps: int, dead_fraction: float,
          improvement: float | None, still_improving: bool, rows: int, num_latents: int,
          stopped: str) -> TrainCheck:  # fmt: skip
    """The :class:`TrainCheck` of a finished run (rules in the module docstring)."""
    reasons, warnings = [], []
    if steps < min_steps:
        reasons.append(f"{steps} optimizer steps, fewer than the {min_steps} needed; train longer "
                       "(leave the length automatic)")  # fmt: skip
    if not fvu <= FVU_CEILING:
        reasons.append(f"FVU {fvu:.3f} is above {FVU_CEILING} (less than half the variance reconstructed); "
                       "train longer, or raise latents / k")  # fmt: skip
    if still_improving and improvement is not None:
        reasons.append(f"the held-out FVU still fell {100 * improvement:.1f}% over the last window; "
                       "train longer")  # fmt: skip
    if rows < num_latents:
        reasons.append(f"{rows} training rows for {num_latents} latents: fewer rows than latents; "
                       "capture more activations (more images or steps)")  # fmt: skip
    if dead_fraction > DEAD_CEILING:
        warnings.append(f"{100 * dead_fraction:.0f}% of the latents are dead (never fire); fewer latents "
                        "would do")  # fmt: skip
    if fvu_on != "held-out rows":
        warnings.append("FVU measured on the training rows (too few rows to hold any out): optimistic")
    if heldout_rows < MIN_JUDGE_ROWS:
        warnings.append(f"only {heldout_rows} held-out rows: too few to judge convergence or trust the FVU; "
                        "capture more activations")  # fmt: skip
    verdict = "under-trained" if reasons else "trained"
    return TrainCheck(fvu, heldout_rows, fvu_on, steps, min_steps, dead_fraction, improvement, stopped,
                      verdict, tuple(reasons), tuple(warnings))  # fmt: skip


def step_cap(min_steps: int, steps_per_pass: int) -> int:
    """Most steps the automatic length takes: ``STEP_CAP_FACTOR`` x max(min_steps, one pass)."""
    return STEP_CAP_FACTOR * max(min_steps, steps_per_pass)


def steps_per_pass(rows: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps of one pass over ``rows`` training rows."""
    return max(1, math.ceil(rows / (batch_size * world)))


def holdout_samples(samples: Tensor, fraction: float, seed: int) -> Tensor:
    """The sample ids held out: a seeded ``fraction`` of the distinct ids in samples (N,) -> (M,).

    All rows of one sample id (one initial noise, under every class prompt) stay on one side: the SAE's
    held-out FVU and the probes' held-out accuracy never see a pairing partner of a training row.
    """
    ids = samples.unique()
    count = int(round(fraction * len(ids)))
    if fraction > 0 and len(ids) > 1:
        count = min(max(count, 1), len(ids) - 1)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return ids[order[:count]].sort().values


class HeldOut:
    """Splits the activations of :func:`~.train.train_sae` into training and held-out rows.

    ids: the held-out sample ids (empty: nothing is held out, and a capped sample of the training rows
    measures FVU instead). to_rows: activations -> SAE rows (N, n_in). per_activation: SAE rows per
    activation.
    """

    def __init__(self, ids: Tensor, n_in: int, to_rows, per_activation: int) -> None:
        self.ids, self.to_rows, self.per_activation = ids, to_rows, per_activation
        self.capacity = max(2, HOLDOUT_ELEMENTS // max(1, n_in))
        self.parts: list[Tensor] = []
        self.kept = 0
        self.train_rows = 0
        """Training SAE rows of the first pass."""

    @property
    def fvu_on(self) -> str:
        """Which rows the FVU is measured on."""
        return "held-out rows" if self.ids.numel() else "training rows"

    def split(self, activations: Tensor, samples: Tensor, first_pass: bool) -> Tensor:
        """The training activations of a chunk; on the first pass the held-out ones are kept (up to the cap)."""
        held = (
            torch.isin(samples, self.ids) if self.ids.numel() else torch.zeros_like(samples, dtype=torch.bool)
        )
        train = activations[~held]
        if first_pass:
            keep = activations[held] if self.ids.numel() else train
            if keep.shape[0] and self.kept < self.capacity:
                rows = self.to_rows(keep)[: self.capacity - self.kept].float().cpu()
                self.parts.append(rows)
                self.kept += rows.shape[0]
            self.train_rows += train.shape[0] * self.per_activation
        return train

    def rows(self) -> Tensor:
        """(M, n_in) the rows FVU is measured on."""
        return torch.cat(self.parts) if self.parts else torch.zeros(0, 0)


class Reservoir:
    """A uniform sample of at most ``capacity`` activations from a stream (Algorithm R, seeded).

    add(activations (n, ...), sample ids (n,), steps (n,)); batch() the kept ones as an ActivationBatch.
    Memory stays bounded however many images are sampled; every activation seen is equally likely kept.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity, self.seen = max(1, capacity), 0
        self.generator = torch.Generator().manual_seed(seed)
        self.acts: Tensor | None = None
        self.sample = torch.zeros(0, dtype=torch.int64)
        self.step = torch.zeros(0, dtype=torch.int64)

    def add(self, activations: Tensor, sample: Tensor, step: Tensor) -> None:
        activations, sample, step = activations.detach().cpu(), sample.cpu().long(), step.cpu().long()
        room = self.capacity - (0 if self.acts is None else self.acts.shape[0])
        take = min(room, activations.shape[0])
        if take:
            head = activations[:take].clone()
            self.acts = head if self.acts is None else torch.cat([self.acts, head])
            self.sample, self.step = (
                torch.cat([self.sample, sample[:take]]),
                torch.cat([self.step, step[:take]]),
            )
        rest = activations.shape[0] - take
        if rest:  # activation number t (1-based) replaces a random slot with probability capacity / t
            t = self.seen + take + torch.arange(1, rest + 1, dtype=torch.float64)
            keep = torch.rand(rest, generator=self.generator, dtype=torch.float64) < self.capacity / t
            slots = torch.randint(self.capacity, (rest,), generator=self.generator)[keep]
            chosen = torch.nonzero(keep).flatten() + take
            self.acts[slots] = activations[chosen].to(self.acts.dtype)
            self.sample[slots], self.step[slots] = sample[chosen], step[chosen]
        self.seen += activations.shape[0]

    def batch(self) -> ActivationBatch | None:
        """The kept activations as an :class:`~.activations.ActivationBatch` (None when empty)."""
        if self.acts is None:
            return None
        return make_batch(self.acts, self.step, sample=self.sample)


__all__ = [
    "DEAD_CEILING",
    "FVU_CEILING",
    "MIN_JUDGE_ROWS",
    "HeldOut",
    "Plateau",
    "Reservoir",
    "TrainCheck",
    "auto_batch_size",
    "heldout_fvu",
    "holdout_samples",
    "judge",
    "step_cap",
    "steps_per_pass",
]
