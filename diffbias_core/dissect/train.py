"""Streaming TopK SAE training with bounded memory.

Rows arrive in any amount through :meth:`SaeTrainer.feed` (a capture hook while a model samples, or
shards through :func:`train_sae`); they are skipped when non-finite, pooled in a fixed-size shuffle
buffer, and trained on in batches of ``batch_size``. The step follows EleutherAI sparsify's recipe:

    loss = FVU + auxk_alpha * AuxK        FVU = |x - x_hat|^2 / |x - mean(x)|^2 over the batch

Adam with a linear learning-rate warm-up; decoder rows kept at unit norm, with the gradient component
parallel to each row removed before the update; ``b_dec`` initialised from the first buffer (geometric
median or mean); AuxK (Gao et al. 2024): the top ``n_in / 2`` latents that have not fired for
``dead_after_rows`` rows reconstruct the residual, which revives dead latents. The encoder and decoder
use sparse backward passes (:mod:`.sparse_grad`): no dense (rows, num_latents) gradient is formed.

Checkpoints (:mod:`.train_state`) are a native SAE file plus a sidecar with the optimizer and trainer
state; the SAE with the lowest running FVU is kept. Several processes train one SAE data-parallel when
``torch.distributed`` is initialized (:mod:`.distributed`).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from ..sae.model import SparseAutoencoder
from . import distributed as ddp
from .activations import ActivationSource, to_sae_inputs
from .sparse_grad import encoder_pre, gather_encode, row_plan, sparse_decode
from .train_check import (
    MIN_JUDGE_ROWS,
    HeldOut,
    Plateau,
    TrainCheck,
    auto_batch_size,
    heldout_fvu,
    judge,
    step_cap,
    steps_per_pass,
)

logger = logging.getLogger(__name__)
_VARIANCE_ROWS = 16
"""A batch with fewer rows measures FVU against the data's running per-row variance, not its own (one row
has none: its FVU would be |error|^2 / 0)."""


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


def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's geometric median of points: (N, D) -> (D,)."""
    guess = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - guess).norm(dim=1).clamp_min(1e-8)  # (N,)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - guess).norm() <= tol * (1.0 + guess.norm()):
            return new
        guess = new
    return guess


def remove_parallel_component_(weight: Tensor, grad: Tensor) -> None:
    """grad[j] -= (grad[j] . w[j]) w[j] for every row j of unit-norm ``weight``: (L, n) each, in place."""
    grad -= (grad * weight).sum(1, keepdim=True) * weight


def normalize_rows_(weight: Tensor) -> None:
    """Scale every row of weight (L, n) to unit norm, in place."""
    weight /= weight.norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps


@dataclass
class _Running:
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


class SaeTrainer:
    """Trains one TopK SAE on rows fed in any amount.

    Args:
        config: the :class:`TrainConfig`.
        d_in: channel width of the hooked activation.
        kernel_size, hook, model_family: as :class:`SparseAutoencoder`.
        device: where to train (float32).
        progress: called with :class:`TrainStats` after every optimizer step.
    """

    def __init__(self, config: TrainConfig, d_in: int, *, kernel_size: int = 1, hook: str = "unet.middle",
                 model_family: str = "unknown", device: torch.device | str | None = None,
                 progress: Callable[[TrainStats], None] | None = None) -> None:  # fmt: skip
        self.config = config
        self.progress = progress
        self.sae = SparseAutoencoder(
            d_in,
            config.num_latents,
            config.k,
            kernel_size=kernel_size,
            hook=hook,
            model_family=model_family,
            dtype=torch.float32,
            device="meta",
        )
        self.sae.to_empty(device=device or "cpu")
        self.sae.reset_parameters(torch.Generator().manual_seed(config.seed))
        self.params = [self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec]
        ddp.broadcast_([p.data for p in self.params])
        self.optimizer = torch.optim.Adam(self.params, lr=config.base_lr)
        self.world = ddp.world()[1]
        self.generator = torch.Generator().manual_seed(config.seed * 7919 + 1)  # one permutation everywhere
        self.capacity = config.batch_size * config.buffer_batches
        self.buffer: Tensor | None = None  # (capacity, n_in), allocated on the first feed
        self.fill = 0
        self._first_rows: Tensor | None = None
        self.rows_since_fired = torch.zeros(config.num_latents, dtype=torch.int64, device=self.sae.device)
        self.best: SparseAutoencoder | None = None
        """A copy of the SAE at the lowest running FVU seen at a best-weights check."""
        self.run = _Running()
        self.stopped = False
        """True once training has ended (stop requested, max_steps reached, or another process ran dry)."""
        self.interrupted = False
        """True when :meth:`request_stop` ended training."""

    # ------------------------------------------------------------------ feeding
    def feed(self, x: Tensor) -> None:
        """Add rows and train on every full buffer.

        x: (N, n_in) rows, or (N, d_in, H, W) maps (converted with :func:`to_sae_inputs`). Rows with a
        non-finite value are dropped and counted in ``stats.skipped``. Any dtype/device; trains in float32.
        Works inside ``torch.inference_mode()`` / ``no_grad()`` (as when ComfyUI samples): training leaves them.
        """
        if self.stopped:
            return
        with torch.inference_mode(False), torch.enable_grad():
            self._feed(x)

    def _feed(self, x: Tensor) -> None:
        x = to_sae_inputs(x.detach(), self.sae.kernel_size) if x.ndim == 4 else x.detach()
        if x.ndim != 2 or x.shape[1] != self.sae.n_in:
            raise ValueError(
                f"SaeTrainer for hook {self.sae.hook!r} expects rows of width {self.sae.n_in} (or maps with "
                f"{self.sae.d_in} channels), got shape {tuple(x.shape)}"
            )
        x = x.to(device=self.sae.device, dtype=torch.float32)
        finite = torch.isfinite(x).all(1)
        bad = int((~finite).sum())
        if bad:
            self.run.skipped += bad
            x = x[finite]
        if self.buffer is None:
            self.buffer = torch.empty(self.capacity, self.sae.n_in, device=self.sae.device)
        while x.shape[0] and not self.stopped:
            take = min(self.capacity - self.fill, x.shape[0])
            self.buffer[self.fill : self.fill + take] = x[:take]
            self.fill += take
            x = x[take:]
            if self.fill == self.capacity:
                self._drain(keep=(self.config.buffer_batches // 2) * self.config.batch_size)

    def finish(self) -> TrainStats:
        """Train on what is left in the buffer (a last smaller batch included) and return the stats."""
        if not self.stopped:
            if self.buffer is not None and self.fill:
                with torch.inference_mode(False), torch.enable_grad():
                    self._drain(keep=0, partial=True)
            if not self.stopped:
                ddp.all_agree(False, self.sae.device)  # release processes still waiting for a step
            self.stopped = True
        if not self.interrupted:  # a stop request keeps the state a resumed run would continue from
            self._check_best()
        return self.stats

    def end(self) -> None:
        """End training now, as the data running out would (not an interruption); releases the other
        processes of a distributed run at their next step."""
        if not self.stopped and ddp.is_distributed():
            ddp.all_agree(False, self.sae.device)
        self.stopped = True

    def request_stop(self) -> None:
        """End training now; :meth:`feed` ignores rows afterwards. The best weights stay available."""
        if not self.stopped and ddp.is_distributed():
            ddp.all_agree(False, self.sae.device)
        self.stopped = self.interrupted = True

    def _drain(self, keep: int, partial: bool = False) -> None:
        """Shuffle the buffer and train on all but ``keep`` rows, in batches from its end."""
        assert self.buffer is not None
        perm = torch.randperm(self.fill, generator=self.generator).to(self.sae.device)
        self.buffer[: self.fill] = self.buffer[perm]
        if not self.run.initialized:
            self._first_rows = self.buffer[: self.fill]  # b_dec starts at their centre (in the first step)
        size = self.config.batch_size
        while self.fill - keep >= size or (partial and self.fill > keep):
            rows = min(size, self.fill - keep)
            if not self._step(self.buffer[self.fill - rows : self.fill]):
                break
            self.fill -= rows

    def _init_from_data(self, rows: Tensor) -> None:
        """b_dec at the centre of the first rows (n_in wide); then the encoder scale that reconstructs them best.

        With b_enc = 0, scaling W_enc by s keeps every TopK selection and scales x_hat - b_dec by s, so the
        least-squares s is <x - b_dec, x_hat - b_dec> / |x_hat - b_dec|^2: one pass, no overshooting start.
        """
        sae, mode = self.sae, self.config.b_dec_init
        if mode != "zero":
            sample = rows[: 4 * self.config.batch_size]  # plenty for a centre, and a bounded cost
            center = geometric_median(sample) if mode == "geometric_median" else sample.mean(0)  # (n_in,)
            center = ddp.mean_(center.view(sae.d_in, -1).mean(1))  # (d_in,): mean over kernel positions
            sae.b_dec.data.copy_(center)
        with torch.no_grad():
            sample = rows[: self.config.batch_size] - sae.b_dec_flat  # (B, n_in)
            code = sae.encode(rows[: self.config.batch_size])
            decoded = sae.decode_sparse(code.indices, code.values)  # (B, n_in), without b_dec
            fit = ddp.mean_(torch.stack([(sample * decoded).sum(), decoded.pow(2).sum()]))
            if fit[1] > 0 and fit[0] > 0:
                sae.W_enc.data.mul_(fit[0] / fit[1])
        self.run.initialized = True

    # ------------------------------------------------------------------ one step
    def _step(self, x: Tensor) -> bool:
        """One optimizer step on rows x: (B, n_in). False when training has ended instead."""
        cfg, sae = self.config, self.sae
        # every process reaches max_steps at the same step, so only the data can run out unevenly
        if (cfg.max_steps is not None and self.run.step >= cfg.max_steps) or not ddp.all_agree(
            True, sae.device
        ):
            self.stopped = True
            return False
        if not self.run.initialized:
            self._init_from_data(self._first_rows if self._first_rows is not None else x)
            self._first_rows = None
        lr = cfg.lr_at(self.run.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        fvu, auxk, top_idx, top_val = self.losses(x)
        (fvu + cfg.auxk_alpha * auxk).backward()
        fired = torch.bincount(top_idx[top_val > 0], minlength=cfg.num_latents)  # (L,)
        l0 = (top_val > 0).sum(1).float().mean()
        summary = torch.stack([fvu.detach(), auxk.detach(), l0, self._batch_variance])
        if self.world > 1:  # one all_reduce for gradients, statistics and firing counts
            flat = torch.cat([p.grad.reshape(-1) for p in self.params] + [summary, fired.float()])
            ddp.mean_(flat)
            offset = 0
            for p in self.params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            summary, fired = flat[offset : offset + 4], flat[offset + 4 :]
        with torch.no_grad():
            remove_parallel_component_(sae.w_dec_flat, self.sae.W_dec.grad.view(cfg.num_latents, -1))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            normalize_rows_(sae.W_dec.data.view(cfg.num_latents, -1))
            self.rows_since_fired += x.shape[0] * self.world
            self.rows_since_fired[fired > 0] = 0
        fvu_value, auxk_value, l0_value, variance = summary.tolist()
        run = self.run
        if x.shape[0] >= _VARIANCE_ROWS:  # per-row variance of the data, for FVU of small batches
            run.variance = variance if not run.variance > 0 else 0.9 * run.variance + 0.1 * variance
        alpha = 2.0 / (cfg.ema_span + 1)
        run.fvu = fvu_value if run.step == 0 else run.fvu + alpha * (fvu_value - run.fvu)
        run.step += 1
        run.rows += x.shape[0] * self.world
        run.l0, run.auxk, run.lr = l0_value, auxk_value, lr
        if run.step % max(1, cfg.ema_span // 2) == 0:
            self._check_best()
        if run.step % 100 == 0 and logger.isEnabledFor(logging.INFO):
            stats = self.stats
            logger.info("step %d: FVU %.4f, L0 %.1f, dead %.1f%%, AuxK %.4f, lr %.3g", stats.step, stats.fvu,
                        stats.l0, 100 * stats.dead_fraction, stats.auxk, stats.lr)  # fmt: skip
        if self.progress is not None:
            self.progress(self.stats)
        return True

    def losses(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(fvu, auxk, top indices (B, k), top values (B, k)) of rows x: (B, n_in), differentiable."""
        sae, cfg = self.sae, self.config
        w_enc, w_dec = sae.w_enc_flat, sae.w_dec_flat
        sae_in = x - sae.b_dec_flat
        pre = encoder_pre(sae_in, w_enc, sae.b_enc)  # (B, L), no autograd
        top_idx = pre.topk(cfg.k, dim=1, sorted=False).indices  # (B, k)
        plan = row_plan(top_idx, cfg.num_latents)  # one sort serves the encoder and decoder gradients
        top_val = gather_encode(sae_in, w_enc, sae.b_enc, top_idx, pre, plan)  # (B, k)
        error = x - (sparse_decode(top_idx, top_val, w_dec, plan) + sae.b_dec_flat)  # (B, n_in)
        total = (x - x.mean(0)).pow(2).sum()
        self._batch_variance = total.detach() / x.shape[0]
        if x.shape[0] < _VARIANCE_ROWS and self.run.variance > 0:  # a small last batch: the data's variance
            total = total.new_tensor(self.run.variance * x.shape[0])
        fvu = error.pow(2).sum() / total.clamp_min(torch.finfo(x.dtype).tiny)
        auxk = fvu.new_zeros(())
        dead = self.rows_since_fired > cfg.dead_after_rows  # (L,)
        num_dead = int(dead.sum()) if cfg.auxk_alpha > 0 else 0
        if num_dead:
            k_aux = max(1, sae.n_in // 2)
            scale = min(num_dead / k_aux, 1.0)
            aux_idx = (
                pre.masked_fill(~dead, -math.inf).topk(min(k_aux, num_dead), dim=1, sorted=False).indices
            )
            aux_plan = row_plan(aux_idx, cfg.num_latents)
            aux_val = gather_encode(sae_in, w_enc, sae.b_enc, aux_idx, pre, aux_plan)  # (B, k_aux)
            residual = sparse_decode(
                aux_idx, aux_val, w_dec, aux_plan
            )  # (B, n_in), no bias: predicts the error
            auxk = scale * (residual - error.detach()).pow(2).sum() / total
        return fvu, auxk, top_idx, top_val.detach()

    # ------------------------------------------------------------------ results
    def _check_best(self) -> None:
        if self.run.step and self.run.fvu < self.run.best_fvu:
            self.run.best_fvu = self.run.fvu
            self.best = self.sae.copy_to()

    @property
    def stats(self) -> TrainStats:
        run = self.run
        dead = float((self.rows_since_fired > self.config.dead_after_rows).float().mean())
        return TrainStats(
            run.step, run.rows, run.skipped, run.fvu, run.l0, dead, run.auxk, run.lr, run.best_fvu
        )

    def provenance(self) -> dict[str, str]:
        """Training facts saved with the SAE."""
        cfg, run = self.config, self.run
        facts = {"trainer": "diffbias.train", "steps": str(run.step), "rows": str(run.rows),
                 "skipped_rows": str(run.skipped), "fvu": f"{run.fvu:.6g}", "best_fvu": f"{run.best_fvu:.6g}",
                 "lr": f"{cfg.base_lr:.6g}", "batch_size": str(cfg.batch_size), "seed": str(cfg.seed),
                 "processes": str(self.world)}  # fmt: skip
        facts.update(run.extra)
        return facts

    def best_sae(self) -> SparseAutoencoder:
        """A copy of the SAE with the lowest running FVU seen (the current weights if none was better)."""
        current = self.best is None or self.run.fvu < self.run.best_fvu
        sae = (self.sae if current else self.best).copy_to()
        sae.provenance = self.provenance()
        return sae

    def save(self, path, *, weights: Literal["best", "current"] = "best") -> None:
        """Write the SAE (best or current weights) as a native file, atomically (process 0 only)."""
        from ..sae.formats import save_sae
        from .train_state import write_current

        if ddp.world()[0] != 0:
            return
        if weights == "best":
            save_sae(self.best_sae(), path)
        else:
            write_current(self, path)


class TrainResult(NamedTuple):
    """What :func:`train_sae` produced.

    sae: the SAE with the lowest running FVU (also written to ``out``). stats: the final :class:`TrainStats`.
    interrupted: True when a stop request or Ctrl-C ended training early. out, checkpoint: files written.
    check: held-out FVU, dead latents and the verdict (:class:`~.train_check.TrainCheck`).
    """

    sae: SparseAutoencoder
    stats: TrainStats
    interrupted: bool
    out: Path | None
    checkpoint: Path | None
    check: TrainCheck | None = None


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


def train_sae(
    source: ActivationSource,
    config: TrainConfig,
    *,
    out: str | PathLike[str] | None = None,
    checkpoint: str | PathLike[str] | None = None,
    resume: bool = False,
    sae_options: Mapping[str, Any] | None = None,
    progress: Callable[[TrainStats], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train an SAE on the activations of ``source`` for ``config.epochs`` passes (None: automatic).

    ``config.holdout`` of the sample ids are held out to measure FVU (:mod:`.train_check`); the result's
    ``check`` has the figures and the verdict. out: where the best SAE is written at the end (native
    format). checkpoint: a resumable checkpoint written about every ``config.checkpoint_every`` steps and
    at the end; with ``resume`` an existing one is continued from the data position it records.
    sae_options: ``kernel_size``, ``model_family``, ``device`` for :class:`SaeTrainer`. stop: polled after
    every chunk; True ends training early (the files are still written). Ctrl-C (in the main thread, with
    Python's default handler) also stops after the current chunk, writes the files, then raises
    KeyboardInterrupt: a resume then continues exactly where the run stopped. A second Ctrl-C stops at once
    and writes only ``out``; the checkpoint stays the last whole one. With torch.distributed initialized,
    each process trains on every world-size-th chunk. Raises ValueError for fewer than two activation rows
    (FVU is undefined).
    """
    from ..attribute.probes import holdout_samples
    from ..sae.formats import check_writable_name
    from .train_state import load_checkpoint, save_checkpoint, state_path

    for target in [out] if checkpoint is None else [out, checkpoint, state_path(checkpoint)]:
        if target is not None:
            check_writable_name(target)  # before any work: a name that cannot be written loses the run
    options = dict(sae_options or {})
    kernel_size = int(options.get("kernel_size", 1))
    rank, world = ddp.world()
    per_activation = rows_per_activation(source.row_shape, kernel_size)
    if source.num_rows * per_activation < 2:
        raise ValueError(
            f"training an SAE needs at least 2 activation rows (FVU compares the error to the rows' variance), "
            f"got {source.num_rows * per_activation}; capture more activations"
        )
    if resume and checkpoint is not None and state_path(checkpoint).exists():  # the state alone resumes
        trainer = load_checkpoint(checkpoint, config, device=options.get("device"), progress=progress)
        if trainer.sae.hook != source.hook or trainer.sae.d_in != source.row_shape[0]:
            raise ValueError(
                f"{checkpoint}: trained on hook {trainer.sae.hook!r} width {trainer.sae.d_in}, but the "
                f"activations are from hook {source.hook!r} with width {source.row_shape[0]}"
            )
        logger.info("resuming %s at step %d", checkpoint, trainer.run.step)
    else:
        trainer = SaeTrainer(config, source.row_shape[0], kernel_size=kernel_size, hook=source.hook,
                             model_family=options.get("model_family", "unknown"), device=options.get("device"),
                             progress=progress)  # fmt: skip
    read = max(1, config.batch_size // per_activation)
    position = {
        "epoch": int(trainer.run.extra.get("epoch", 0)),
        "chunk": int(trainer.run.extra.get("chunk", 0)),
    }
    held = HeldOut(holdout_samples(source.column("sample"), config.holdout, config.seed), trainer.sae.n_in,
                   lambda acts: to_sae_inputs(acts, kernel_size) if acts.ndim == 4 else acts, per_activation)  # fmt: skip
    plateau = Plateau(config.min_steps // 2, config.plateau)
    every = max(1, config.min_steps // 10)
    per_pass = steps_per_pass(
        source.num_rows * per_activation * (1 - config.holdout), config.batch_size, world
    )
    cap = step_cap(config.min_steps, per_pass)
    next_checkpoint, next_eval = trainer.run.step + config.checkpoint_every, trainer.run.step + every
    interrupted, stopped = False, "end of the data"
    first_epoch = position["epoch"]
    pending: list[int] = []  # a Ctrl-C waiting for the end of the chunk

    def on_sigint(signum, frame) -> None:
        pending.append(signum)
        if len(pending) > 1:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once
        logger.warning("interrupted: finishing this chunk, then writing the files (Ctrl-C again to stop at once)")

    defer = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)  # fmt: skip
    if defer:
        signal.signal(signal.SIGINT, on_sigint)

    def write() -> None:
        if checkpoint is not None:
            save_checkpoint(trainer, checkpoint, {key: str(value) for key, value in position.items()})
        if out is not None:
            trainer.save(out)

    def converged() -> bool:  # the automatic length's stopping rule, once per evaluation
        plateau.add(trainer.run.step, _evaluate(trainer.sae, held))
        ready = config.epochs is None and position["epoch"] >= 1 and trainer.run.step >= config.min_steps
        return ready and (held.kept < MIN_JUDGE_ROWS or plateau.converged())

    try:
        while (config.epochs is None or position["epoch"] < config.epochs) and not trainer.stopped:
            start = position["chunk"]
            for i, batch in enumerate(source.iter_batches(read, start=start + rank, every=world)):
                trainer.feed(held.split(batch.activations, batch.sample, position["epoch"] == first_epoch))
                position["chunk"] = start + (i + 1) * world
                if pending or (stop is not None and stop()):
                    trainer.request_stop()
                    interrupted, stopped = True, "stopped"
                if trainer.run.step >= next_eval and not trainer.stopped:
                    next_eval = trainer.run.step + every
                    if converged():
                        trainer.end()
                        stopped = "held-out FVU converged" if held.kept >= MIN_JUDGE_ROWS else "min_steps"
                    elif config.epochs is None and trainer.run.step >= cap:
                        trainer.end()
                        stopped = f"step cap {cap}"
                if trainer.stopped:
                    break
                if checkpoint is not None and config.checkpoint_every and trainer.run.step >= next_checkpoint:
                    save_checkpoint(trainer, checkpoint, {key: str(value) for key, value in position.items()})
                    next_checkpoint = trainer.run.step + config.checkpoint_every
            else:
                position = {"epoch": position["epoch"] + 1, "chunk": 0}
        if config.max_steps is not None and trainer.run.step >= config.max_steps:
            stopped = f"max_steps {config.max_steps}"
        if not plateau.history or plateau.history[-1][0] != trainer.run.step:  # the figures at the end
            plateau.add(trainer.run.step, _evaluate(trainer.sae, held))
        trainer.finish()
    except KeyboardInterrupt:
        trainer.stopped = True  # no further collective calls
        if len(pending) > 1:  # stopped at once, maybe mid-step: the best weights are a whole copy, the state not
            if out is not None:
                trainer.save(out)
        else:
            write()
        raise
    finally:
        if defer:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    write()
    if pending:
        raise KeyboardInterrupt
    sae = trainer.best_sae()
    rows = held.rows()
    stats = trainer.stats
    check = judge(fvu=_evaluate(sae, held), heldout_rows=rows.shape[0],
                  fvu_on=held.fvu_on, steps=stats.step, min_steps=config.min_steps,
                  dead_fraction=stats.dead_fraction, improvement=plateau.improvement(),
                  still_improving=held.kept >= MIN_JUDGE_ROWS and plateau.improvement() is not None
                  and not plateau.converged(),
                  rows=held.train_rows * world if held.train_rows else stats.rows, num_latents=config.num_latents,
                  stopped=stopped)  # fmt: skip
    return TrainResult(sae, stats, interrupted, Path(out) if out else None,
                       Path(checkpoint) if checkpoint else None, check)  # fmt: skip


def _evaluate(sae: SparseAutoencoder, held: HeldOut) -> float:
    """FVU of the SAE's current weights on the held-out rows (NaN with too few of them)."""
    try:
        return heldout_fvu(sae, held.rows())
    except ValueError:
        return float("nan")


__all__ = [
    "SaeTrainer",
    "TrainConfig",
    "TrainResult",
    "TrainStats",
    "config_for_rows",
    "geometric_median",
    "normalize_rows_",
    "remove_parallel_component_",
    "rows_per_activation",
    "train_sae",
]
