"""Train an SAE on activation shards or any :class:`~.activations.ActivationSource`: :func:`train_sae`.

The pieces, one module each: :mod:`.train_config` (:class:`TrainConfig`, :class:`TrainStats`, the automatic
configuration), :mod:`.train_step` (the losses: FVU + AuxK with sparse backward passes), :mod:`.trainer`
(:class:`SaeTrainer`: buffer, optimizer, best weights, state), :mod:`.train_state` (resumable checkpoints) and
:mod:`.train_check` (held-out FVU, the automatic length and the verdict). This module runs the passes over
the data, the checkpoints, Ctrl-C and the final check; its names are also importable from here.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

from ..base.atomic import check_writable_name
from ..base.layout import activations_to_rows
from ..sae.model import SparseAutoencoder
from . import distributed as ddp
from .activations import ActivationSource
from .train_check import (
    MIN_JUDGE_ROWS,
    HeldOut,
    Plateau,
    TrainCheck,
    heldout_fvu,
    holdout_samples,
    judge,
    step_cap,
    steps_per_pass,
)
from .train_config import TrainConfig, TrainStats, config_for_rows, rows_per_activation
from .train_state import load_checkpoint, save_checkpoint, state_path
from .train_step import geometric_median, normalize_rows_, remove_parallel_component_
from .trainer import SaeTrainer

logger = logging.getLogger(__name__)


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
    for target in [out] if checkpoint is None else [out, checkpoint, state_path(checkpoint)]:
        if target is not None:
            check_writable_name(target)  # before any work: a name that cannot be written loses the run
    options = dict(sae_options or {})
    kernel_size = int(options.get("kernel_size", 1))
    per_activation = rows_per_activation(source.row_shape, kernel_size)
    if source.num_rows * per_activation < 2:
        raise ValueError(
            f"training an SAE needs at least 2 activation rows (FVU compares the error to the rows' variance), "
            f"got {source.num_rows * per_activation}; capture more activations"
        )
    trainer = _trainer(source, config, checkpoint if resume else None, options, progress)
    run = _Run(trainer, source, config, per_activation, out=out, checkpoint=checkpoint, stop=stop)
    with _deferred_sigint(run.pending):
        run.train()
    run.write()
    if run.pending:
        raise KeyboardInterrupt
    return run.result()


def _trainer(source: ActivationSource, config: TrainConfig, resume: str | PathLike[str] | None,
             options: Mapping[str, Any], progress: Callable[[TrainStats], None] | None) -> SaeTrainer:  # fmt: skip
    """A new trainer, or the one checkpoint ``resume`` holds (when its state sidecar exists)."""
    if resume is None or not state_path(resume).exists():  # the state alone resumes
        return SaeTrainer(config, source.row_shape[0], kernel_size=int(options.get("kernel_size", 1)),
                          hook=source.hook, model_family=options.get("model_family", "unknown"),
                          device=options.get("device"), progress=progress)  # fmt: skip
    trainer = load_checkpoint(resume, config, device=options.get("device"), progress=progress)
    if trainer.sae.hook != source.hook or trainer.sae.d_in != source.row_shape[0]:
        raise ValueError(
            f"{resume}: trained on hook {trainer.sae.hook!r} width {trainer.sae.d_in}, but the "
            f"activations are from hook {source.hook!r} with width {source.row_shape[0]}"
        )
    logger.info("resuming %s at step %d", resume, trainer.stats.step)
    return trainer


@contextmanager
def _deferred_sigint(pending: list[int]) -> Iterator[None]:
    """In the main thread with Python's default handler: the first Ctrl-C is recorded in ``pending`` (the
    run stops after its chunk), the second raises KeyboardInterrupt at once."""

    def on_sigint(signum, frame) -> None:
        pending.append(signum)
        if len(pending) > 1:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once
        logger.warning(
            "interrupted: finishing this chunk, then writing the files (Ctrl-C again to stop at once)"
        )

    defer = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)  # fmt: skip
    if defer:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        if defer:
            signal.signal(signal.SIGINT, signal.default_int_handler)


class _Run:
    """One :func:`train_sae` run: the passes over the data, evaluations, checkpoints and the final check."""

    def __init__(self, trainer: SaeTrainer, source: ActivationSource, config: TrainConfig, per_activation: int,
                 *, out, checkpoint, stop: Callable[[], bool] | None) -> None:  # fmt: skip
        self.trainer, self.source, self.config = trainer, source, config
        self.out, self.checkpoint, self.stop = out, checkpoint, stop
        self.rank, self.world = ddp.world()
        self.read = max(1, config.batch_size // per_activation)  # activations per chunk
        facts = trainer.facts
        self.position = {"epoch": int(facts.get("epoch", 0)), "chunk": int(facts.get("chunk", 0))}
        self.first_epoch = self.position["epoch"]
        kernel_size = trainer.sae.kernel_size
        self.held = HeldOut(holdout_samples(source.column("sample"), config.holdout, config.seed), trainer.sae.n_in,
                            lambda acts: activations_to_rows(acts, kernel_size), per_activation)  # fmt: skip
        self.plateau = Plateau(config.min_steps // 2, config.plateau)
        self.every = max(1, config.min_steps // 10)
        per_pass = steps_per_pass(source.num_rows * per_activation * (1 - config.holdout), config.batch_size,
                                  self.world)  # fmt: skip
        self.cap = step_cap(config.min_steps, per_pass)
        step = trainer.stats.step
        self.next_checkpoint, self.next_eval = step + config.checkpoint_every, step + self.every
        self.interrupted, self.stopped = False, "end of the data"
        self.pending: list[int] = []  # Ctrl-C signals waiting for the end of the chunk

    def train(self) -> None:
        """All passes; on Ctrl-C the files are written before KeyboardInterrupt goes on."""
        trainer, config = self.trainer, self.config
        try:
            while (config.epochs is None or self.position["epoch"] < config.epochs) and not trainer.stopped:
                if self._one_pass():
                    self.position = {"epoch": self.position["epoch"] + 1, "chunk": 0}
            step = trainer.run.step
            if config.max_steps is not None and step >= config.max_steps:
                self.stopped = f"max_steps {config.max_steps}"
            if not self.plateau.history or self.plateau.history[-1][0] != step:
                self.plateau.add(step, _evaluate(trainer.sae, self.held))  # the figures at the end
            trainer.finish()
        except KeyboardInterrupt:
            trainer.stopped = True  # no further collective calls
            if (
                len(self.pending) > 1
            ):  # stopped at once, maybe mid-step: the best weights are whole, the state not
                if self.out is not None:
                    trainer.save(self.out)
            else:
                self.write()
            raise

    def _one_pass(self) -> bool:
        """Train on the rest of this pass; True when the pass reached the end of the data."""
        trainer, start = self.trainer, self.position["chunk"]
        first_pass = self.position["epoch"] == self.first_epoch
        batches = self.source.iter_batches(self.read, start=start + self.rank, every=self.world)
        for i, batch in enumerate(batches):
            trainer.feed(self.held.split(batch.activations, batch.sample, first_pass))
            self.position["chunk"] = start + (i + 1) * self.world
            if self.pending or (self.stop is not None and self.stop()):
                trainer.request_stop()
                self.interrupted, self.stopped = True, "stopped"
            step = trainer.run.step
            if step >= self.next_eval and not trainer.stopped:
                self.next_eval = step + self.every
                self._check_length(step)
            if trainer.stopped:
                return False
            if self.checkpoint is not None and self.config.checkpoint_every and step >= self.next_checkpoint:
                self._save_checkpoint()
                self.next_checkpoint = step + self.config.checkpoint_every
        return True

    def _check_length(self, step: int) -> None:
        """The automatic length's stopping rule, once per evaluation: converged, or the step cap."""
        config, held = self.config, self.held
        self.plateau.add(step, _evaluate(self.trainer.sae, held))
        ready = config.epochs is None and self.position["epoch"] >= 1 and step >= config.min_steps
        if ready and (held.kept < MIN_JUDGE_ROWS or self.plateau.converged()):
            self.trainer.end()
            self.stopped = "held-out FVU converged" if held.kept >= MIN_JUDGE_ROWS else "min_steps"
        elif config.epochs is None and step >= self.cap:
            self.trainer.end()
            self.stopped = f"step cap {self.cap}"

    def _save_checkpoint(self) -> None:
        save_checkpoint(
            self.trainer, self.checkpoint, {key: str(value) for key, value in self.position.items()}
        )

    def write(self) -> None:
        """The checkpoint (when asked for) and the best SAE (to ``out``)."""
        if self.checkpoint is not None:
            self._save_checkpoint()
        if self.out is not None:
            self.trainer.save(self.out)

    def result(self) -> TrainResult:
        trainer, config, held, plateau = self.trainer, self.config, self.held, self.plateau
        sae = trainer.best_sae()
        stats = trainer.stats
        still_improving = (held.kept >= MIN_JUDGE_ROWS and plateau.improvement() is not None
                           and not plateau.converged())  # fmt: skip
        check = judge(fvu=_evaluate(sae, held), heldout_rows=held.rows().shape[0], fvu_on=held.fvu_on,
                      steps=stats.step, min_steps=config.min_steps, dead_fraction=stats.dead_fraction,
                      improvement=plateau.improvement(), still_improving=still_improving,
                      rows=held.train_rows * self.world if held.train_rows else stats.rows,
                      num_latents=config.num_latents, stopped=self.stopped)  # fmt: skip
        out, checkpoint = self.out, self.checkpoint
        return TrainResult(sae, stats, self.interrupted, Path(out) if out else None,
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
