"""Streaming TopK SAE training with bounded memory: :class:`SaeTrainer`.

Rows arrive in any amount through :meth:`SaeTrainer.feed` (a capture hook while a model samples, or
shards through :func:`~.train.train_sae`); they are skipped when non-finite, pooled in a fixed-size shuffle
buffer, and trained on in batches of ``batch_size`` with the losses of :mod:`.train_step`: Adam with a
linear learning-rate warm-up; decoder rows kept at unit norm, with the gradient component parallel to each
row removed before the update; ``b_dec`` initialised from the first buffer (geometric median or mean). The
SAE with the lowest running FVU is kept. Several processes train one SAE data-parallel when
``torch.distributed`` is initialized (:mod:`.distributed`). :meth:`SaeTrainer.state_dict` holds everything a
resumed run needs (:mod:`.train_state` writes it to a checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from ..base.grad_mode import trainable
from ..base.layout import activations_to_rows
from ..sae.model import WEIGHTS, SparseAutoencoder
from ..sae.native import save_sae
from . import distributed as ddp
from .train_config import TrainConfig, TrainCounters, TrainStats
from .train_step import (
    VARIANCE_ROWS,
    Losses,
    geometric_median,
    normalize_rows_,
    remove_parallel_component_,
    sae_losses,
)

logger = logging.getLogger(__name__)


_RUN_FIELDS = ("step", "rows", "skipped", "fvu", "l0", "auxk", "lr", "best_fvu", "variance")
"""The :class:`~.train_config.TrainCounters` a state holds as numbers."""


class SaeTrainer:
    """Trains one TopK SAE on rows fed in any amount.

    Every method works inside ``torch.inference_mode()`` (as when ComfyUI samples): the trainer leaves it
    where it makes or changes what it trains (construction, :meth:`feed`, :meth:`finish`, :meth:`load_state_dict`).

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
        with trainable():  # weights made inside inference mode could never be trained
            self.sae = SparseAutoencoder(d_in, config.num_latents, config.k, kernel_size=kernel_size, hook=hook,
                                         model_family=model_family, dtype=torch.float32, device="meta")  # fmt: skip
            self.sae.to_empty(device=device or "cpu")
            self.sae.reset_parameters(torch.Generator().manual_seed(config.seed))
            self.params = [self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec]
            ddp.broadcast_([p.data for p in self.params])
            self.optimizer = torch.optim.Adam(self.params, lr=config.base_lr)
            self.rows_since_fired = torch.zeros(config.num_latents, dtype=torch.int64, device=self.sae.device)
        self.world = ddp.world()[1]
        self.generator = torch.Generator().manual_seed(config.seed * 7919 + 1)  # one permutation everywhere
        self.capacity = config.batch_size * config.buffer_batches
        self.buffer: Tensor | None = None  # (capacity, n_in), allocated on the first feed
        self.fill = 0
        self._first_rows: Tensor | None = None
        self.best: SparseAutoencoder | None = None
        """A copy of the SAE at the lowest running FVU seen at a best-weights check."""
        self.run = TrainCounters()
        self.stopped = False
        """True once training has ended (stop requested, max_steps reached, or another process ran dry)."""
        self.interrupted = False
        """True when :meth:`request_stop` ended training."""

    # ------------------------------------------------------------------ feeding
    def feed(self, x: Tensor) -> None:
        """Add rows and train on every full buffer.

        x: (N, n_in) rows, (N, T, d_in) tokens or (N, d_in, H, W) maps (converted with
        :func:`~..base.layout.activations_to_rows`). Rows with a
        non-finite value are dropped and counted in ``stats.skipped``. Any dtype/device; trains in float32.
        """
        if self.stopped:
            return
        with trainable():
            self._feed(x)

    def _feed(self, x: Tensor) -> None:
        x = activations_to_rows(x.detach(), self.sae.kernel_size)
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
        with trainable():
            if not self.stopped:
                if self.buffer is not None and self.fill:
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
        fvu, auxk, top_idx, top_val, batch_variance = self.losses(x)
        (fvu + cfg.auxk_alpha * auxk).backward()
        fired = torch.bincount(top_idx[top_val > 0], minlength=cfg.num_latents)  # (L,)
        l0 = (top_val > 0).sum(1).float().mean()
        summary = torch.stack([fvu.detach(), auxk.detach(), l0, batch_variance])
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
        if x.shape[0] >= VARIANCE_ROWS:  # per-row variance of the data, for FVU of small batches
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

    def losses(self, x: Tensor) -> Losses:
        """The :class:`~.train_step.Losses` of rows x: (B, n_in) at the current weights, differentiable."""
        dead = self.rows_since_fired > self.config.dead_after_rows  # (L,)
        return sae_losses(self.sae, x, dead, auxk_alpha=self.config.auxk_alpha, variance=self.run.variance)

    # ------------------------------------------------------------------ state
    def note(self, facts: Mapping[str, str]) -> None:
        """Keep string ``facts`` (e.g. a data position) in the provenance and the :meth:`state_dict`."""
        self.run.extra = {**self.run.extra, **facts}

    @property
    def facts(self) -> dict[str, str]:
        """The strings given to :meth:`note` (and restored by :meth:`load_state_dict`)."""
        return dict(self.run.extra)

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Everything a resumed run needs, as (tensors, strings), for a checkpoint file.

        Tensors (on the CPU): ``param.<name>`` and ``best.<name>`` (the current and the best weights, names
        as ``SparseAutoencoder``), ``adam.<name>.<key>`` (Adam's state; ``step`` as (1,)),
        ``rows_since_fired`` (L,), ``generator`` (the shuffling generator's state) and ``buffer`` (the rows
        not yet trained on, when there are any). Strings: ``config`` (JSON), ``d_in``, ``kernel_size``,
        ``hook``, ``model_family``, ``run`` (JSON counters), ``initialized`` and ``extra`` (JSON of :meth:`note`).
        """
        tensors = {f"param.{name}": getattr(self.sae, name).detach() for name in WEIGHTS}
        for name in WEIGHTS:
            for key, value in self.optimizer.state.get(getattr(self.sae, name), {}).items():
                tensors[f"adam.{name}.{key}"] = (
                    value.detach().reshape(-1) if key == "step" else value.detach()
                )
        if self.best is not None:
            tensors.update({f"best.{name}": getattr(self.best, name).detach() for name in WEIGHTS})
        tensors["rows_since_fired"] = self.rows_since_fired
        tensors["generator"] = self.generator.get_state()
        if self.buffer is not None and self.fill:
            tensors["buffer"] = self.buffer[: self.fill]
        sae, run = self.sae, self.run
        facts = {
            "config": json.dumps(dataclasses.asdict(self.config)), "d_in": str(sae.d_in),
            "kernel_size": str(sae.kernel_size), "hook": sae.hook, "model_family": sae.model_family,
            "run": json.dumps({name: getattr(run, name) for name in _RUN_FIELDS}),
            "initialized": str(run.initialized), "extra": json.dumps(run.extra),
        }  # fmt: skip
        return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}, facts

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, Tensor], facts: Mapping[str, str],
                        config: TrainConfig | None = None, *, device: torch.device | str | None = None,
                        progress: Callable[[TrainStats], None] | None = None) -> SaeTrainer:  # fmt: skip
        """A trainer restored from a :meth:`state_dict`, ready to continue.

        ``config``: the config to continue with (default: the recorded one); it must keep num_latents and k
        (ValueError otherwise). In a multi-process run every process restores the weights and optimizer;
        only process 0 gets the shuffle buffer and generator back.
        """
        recorded = TrainConfig(**json.loads(facts["config"]))
        config = config or recorded
        if (config.num_latents, config.k) != (recorded.num_latents, recorded.k):
            raise ValueError(
                f"trained with num_latents {recorded.num_latents}, k {recorded.k}; cannot continue with "
                f"num_latents {config.num_latents}, k {config.k}"
            )
        trainer = cls(config, int(facts["d_in"]), kernel_size=int(facts["kernel_size"]), hook=facts["hook"],
                      model_family=facts["model_family"], device=device, progress=progress)  # fmt: skip
        trainer.load_state_dict(tensors, facts, shuffle=ddp.world()[0] == 0)
        return trainer

    def load_state_dict(
        self, tensors: Mapping[str, Tensor], facts: Mapping[str, str], *, shuffle: bool = True
    ) -> None:
        """Restore a :meth:`state_dict` of a trainer with the same sizes; ``shuffle``: also the shuffle buffer
        and generator. Counters that a state of an older version lacks keep their defaults."""
        with trainable(), torch.no_grad():
            self._load_tensors(tensors, shuffle)
        run = json.loads(facts["run"])
        for name in _RUN_FIELDS:
            if name in run:
                setattr(self.run, name, type(getattr(self.run, name))(run[name]))
        self.run.initialized = facts["initialized"] == "True"
        self.run.extra = json.loads(facts.get("extra", "{}"))

    def _load_tensors(self, tensors: Mapping[str, Tensor], shuffle: bool) -> None:
        dev = self.sae.device
        for name in WEIGHTS:
            param = getattr(self.sae, name)
            param.copy_(tensors[f"param.{name}"])
            state = {key.rsplit(".", 1)[1]: value.to(dev, copy=True) for key, value in tensors.items()
                     if key.startswith(f"adam.{name}.")}  # fmt: skip
            if state:
                state["step"] = state["step"].reshape(()).cpu()
                self.optimizer.state[param] = state
        if "best.W_dec" in tensors:
            self.best = self.sae.copy_to()
            for name in WEIGHTS:
                getattr(self.best, name).copy_(tensors[f"best.{name}"])
        self.rows_since_fired.copy_(tensors["rows_since_fired"])
        if shuffle:
            self.generator.set_state(tensors["generator"])
            if "buffer" in tensors:
                rows = tensors["buffer"]
                self.buffer = torch.empty(self.capacity, self.sae.n_in, device=dev)
                self.fill = min(rows.shape[0], self.capacity)
                self.buffer[: self.fill] = rows[: self.fill].to(dev)

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

    def current_sae(self) -> SparseAutoencoder:
        """A copy of the SAE at its current weights, with the training provenance."""
        sae = self.sae.copy_to()
        sae.provenance = self.provenance()
        return sae

    def save(self, path, *, weights: Literal["best", "current"] = "best") -> None:
        """Write the SAE (best or current weights) as a native file, atomically (process 0 only)."""
        if ddp.world()[0] == 0:
            save_sae(self.best_sae() if weights == "best" else self.current_sae(), path)


__all__ = ["SaeTrainer"]
