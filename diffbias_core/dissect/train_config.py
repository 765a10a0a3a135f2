"""How an SAE is trained (:class:`TrainConfig`), what a run reports (:class:`TrainStats`), and the automatic
configuration for a number of rows (:func:`config_for_rows`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from .train_check import auto_batch_size


@dataclass(frozen=True)
class TrainConfig:
    """How to train a TopK SAE."""

    num_latents: int
    """Dictionary size L (latents), >= k."""
    k: int
    """Active latents per row, 1 <= k <= num_latents."""
    batch_size: int = 4096
    """Rows per optimizer step (per process)."""
    lr: float | None = None
    """Adam learning rate; None: sparsify's rule 2e-4 / sqrt(num_latents / 2**14)."""
    warmup_steps: int = 1000
    """Steps of linear learning-rate warm-up from lr / warmup_steps to lr; 0 = none."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """After warm-up: constant, or linear decay to zero at ``max_steps`` (which it then needs)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; None: when the data ends."""
    epochs: int | None = 1
    """Passes over a finite source in :func:`train_sae` (>= 1); None: automatic, see :mod:`.train_check`
    (at least one pass and ``min_steps`` steps, then until the held-out FVU stops improving)."""
    min_steps: int = 2000
    """Optimizer steps a trained SAE needs: the automatic length takes at least this many, and a run with
    fewer is reported under-trained (>= 1)."""
    plateau: float = 0.02
    """The automatic length stops once the held-out FVU fell by less than this fraction over the last
    ``min_steps // 2`` steps (> 0)."""
    holdout: float = 0.1
    """Share of the sample ids :func:`train_sae` keeps out of training to measure FVU, in [0, 0.5]."""
    buffer_batches: int = 8
    """Shuffle-buffer size in batches (>= 1): memory is buffer_batches * batch_size rows."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss (>= 0; 0 disables it)."""
    dead_after_rows: int = 1_000_000
    """A latent that has not fired for this many rows is dead (AuxK then trains it)."""
    b_dec_init: Literal["geometric_median", "mean", "zero"] = "geometric_median"
    """How b_dec is initialised from the first buffer of rows."""
    seed: int = 0
    """Seed of the initial weights and of the shuffling."""
    checkpoint_every: int = 0
    """:func:`train_sae` writes a resumable checkpoint about every this many steps (0: at the end only)."""
    ema_span: int = 20
    """Span (steps) of the running FVU average that selects the best weights (>= 1)."""

    def __post_init__(self) -> None:
        positive = {"num_latents": self.num_latents, "k": self.k, "batch_size": self.batch_size,
                    "epochs": 1 if self.epochs is None else self.epochs, "buffer_batches": self.buffer_batches,
                    "ema_span": self.ema_span, "dead_after_rows": self.dead_after_rows,
                    "min_steps": self.min_steps}  # fmt: skip
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.k > self.num_latents:
            raise ValueError(f"TrainConfig.k must be <= num_latents ({self.num_latents}), got {self.k}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be > 0 (or None for the default), got {self.lr!r}")
        for name in ("warmup_steps", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(
                f"TrainConfig.max_steps must be a positive integer or None, got {self.max_steps!r}"
            )
        if not (0 < self.plateau < 1):
            raise ValueError(f"TrainConfig.plateau must be in (0, 1), got {self.plateau!r}")
        if not (0 <= self.holdout <= 0.5):
            raise ValueError(f"TrainConfig.holdout must be in [0, 0.5], got {self.holdout!r}")
        if not self.auxk_alpha >= 0:
            raise ValueError(f"TrainConfig.auxk_alpha must be >= 0, got {self.auxk_alpha!r}")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(
                f"TrainConfig.lr_schedule must be 'constant' or 'linear', got {self.lr_schedule!r}"
            )
        if self.lr_schedule == "linear" and self.max_steps is None:
            raise ValueError(
                "TrainConfig.lr_schedule 'linear' decays to zero at max_steps, so it needs max_steps"
            )
        if self.b_dec_init not in ("geometric_median", "mean", "zero"):
            raise ValueError(
                f"TrainConfig.b_dec_init must be 'geometric_median', 'mean' or 'zero', got {self.b_dec_init!r}"
            )

    @property
    def base_lr(self) -> float:
        """The learning rate after warm-up."""
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.num_latents / 2**14)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        scale = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_schedule == "linear":
            scale = min(scale, max(0.0, (self.max_steps - step) / max(1, self.max_steps - self.warmup_steps)))
        return self.base_lr * scale


class TrainStats(NamedTuple):
    """Progress of a training run (all processes together).

    step: optimizer steps taken. rows: rows trained on. skipped: non-finite rows dropped.
    fvu: running (EMA) FVU, each batch measured before its update (an honest held-out estimate).
    l0: mean active latents per row in the last batch. dead_fraction: share of latents not fired for
    ``dead_after_rows`` rows. auxk: last AuxK loss. lr: last learning rate. best_fvu: lowest running FVU
    at a best-weights check (the weights :meth:`SaeTrainer.save` writes by default).
    """

    step: int
    rows: int
    skipped: int
    fvu: float
    l0: float
    dead_fraction: float
    auxk: float
    lr: float
    best_fvu: float


@dataclass
class TrainCounters:
    """The running counters of a trainer (see :class:`TrainStats` for their meaning); ``variance`` is the
    data's running per-row variance, ``initialized`` whether ``b_dec`` was set from data, ``extra`` strings
    kept with the state and the provenance (a data position)."""

    step: int = 0
    rows: int = 0
    skipped: int = 0
    fvu: float = float("nan")
    l0: float = float("nan")
    auxk: float = 0.0
    lr: float = 0.0
    best_fvu: float = float("inf")
    variance: float = float("nan")
    initialized: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def rows_per_activation(row_shape: tuple[int, ...], kernel_size: int = 1) -> int:
    """SAE rows one activation gives: H*W for a (C, H, W) map and kernel 1, else 1."""
    return row_shape[1] * row_shape[2] if len(row_shape) == 3 and kernel_size == 1 else 1


def config_for_rows(num_latents: int, k: int, rows: int, **fields: Any) -> TrainConfig:
    """The automatic :class:`TrainConfig` for ``rows`` SAE rows per pass (``fields`` override it).

    Automatic length (``epochs=None``); batch size from :func:`~.train_check.auto_batch_size`, at most the
    training rows, and a shuffle buffer of at most one pass (so every pass takes steps); warm-up a tenth
    of ``min_steps`` (at most sparsify's 1000); a latent is dead when it has not fired for one pass over
    the data (at most 1M rows), so that AuxK and the dead count work on small data too.
    """
    base = TrainConfig(num_latents=num_latents, k=k)
    min_steps = fields.get("min_steps", base.min_steps)
    train_rows = max(1, int(rows * (1 - fields.get("holdout", base.holdout))))
    batch = fields.pop("batch_size", None) or min(auto_batch_size(rows), train_rows)
    values = {"epochs": None, "batch_size": batch, "warmup_steps": min(1000, min_steps // 10),
              "dead_after_rows": max(1, min(base.dead_after_rows, rows)),
              "buffer_batches": max(1, min(base.buffer_batches, train_rows // batch))}  # fmt: skip
    values.update(fields)
    return TrainConfig(num_latents=num_latents, k=k, **values)


__all__ = ["TrainConfig", "TrainCounters", "TrainStats", "config_for_rows", "rows_per_activation"]
