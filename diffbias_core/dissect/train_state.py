"""Resumable training checkpoints: a native SAE file plus a state sidecar.

``CKPT.safetensors`` is an ordinary native SAE file (the current weights; any tool loads it) and
``CKPT.state.safetensors`` holds what resuming needs, the trainer's :meth:`~.trainer.SaeTrainer.state_dict`:
Adam moments, the best weights so far, the firing counters, the shuffle buffer and generator, the counters and
the config. Both are written atomically, the sidecar first; the sidecar alone holds everything a resume needs
(the current weights included), so a crash between the two writes loses nothing: resuming continues from the
sidecar and rewrites the SAE file. Resuming a single process continues bit-identically to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from os import PathLike
from pathlib import Path

import torch

from ..base.safefile import check_metadata_version, read_safetensors, write_safetensors
from ..base.tensorfile import FormatError
from ..sae.native import native_metadata, save_sae
from . import distributed as ddp
from .train_config import TrainConfig
from .trainer import SaeTrainer

STATE_FORMAT = "diffbias.train_state"
STATE_VERSION = 1
logger = logging.getLogger(__name__)


def state_path(path: str | PathLike[str]) -> Path:
    """The sidecar of checkpoint ``path``: ``X.safetensors`` -> ``X.state.safetensors``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.state{path.suffix or '.safetensors'}")


def write_current(trainer: SaeTrainer, path: str | PathLike[str]) -> None:
    """Write the trainer's current weights as a native SAE file (atomically)."""
    save_sae(trainer.current_sae(), path)


def save_checkpoint(
    trainer: SaeTrainer, path: str | PathLike[str], extra: dict[str, str] | None = None
) -> None:
    """Write a resumable checkpoint (process 0 only). ``extra``: strings to keep (e.g. a data position)."""
    if ddp.world()[0] != 0:
        return
    trainer.note(extra or {})
    tensors, facts = trainer.state_dict()
    metadata = {"format": STATE_FORMAT, "format_version": str(STATE_VERSION), **facts}
    write_safetensors(tensors, metadata, state_path(path))
    write_current(trainer, path)


def load_checkpoint(path: str | PathLike[str], config: TrainConfig | None = None, *,
                    device: torch.device | str | None = None, progress=None) -> SaeTrainer:  # fmt: skip
    """A trainer restored from checkpoint ``path`` (and its sidecar), ready to continue.

    ``config``: the config to continue with (default: the recorded one); it must keep num_latents and k.
    In a multi-process run every process restores the weights and optimizer; only process 0 gets the
    saved shuffle buffer back. Raises FormatError naming the file on a missing or mismatched sidecar.
    """
    sidecar = state_path(path)
    if not sidecar.exists():
        raise FormatError(f"{path}: no training state {sidecar.name} beside it; it cannot be resumed")
    tensors, metadata = read_safetensors(sidecar)
    check_metadata_version(sidecar, metadata, STATE_FORMAT, STATE_VERSION)
    try:
        trainer = SaeTrainer.from_state_dict(tensors, metadata, config, device=device, progress=progress)
    except ValueError as error:
        raise ValueError(f"{sidecar}: {error}") from None
    try:
        saved_steps = json.loads(native_metadata(Path(path)).get("provenance", "{}")).get("steps")
    except (FormatError, ValueError):
        saved_steps = None  # missing or damaged: the sidecar has the weights, the file is rewritten below
    step = trainer.stats.step
    if saved_steps != str(step) and ddp.world()[0] == 0:
        logger.warning("%s is at step %s but %s at %d (a checkpoint write was interrupted); resuming from the "
                       "state and rewriting the SAE file from it", path, saved_steps, sidecar.name, step)  # fmt: skip
        write_current(trainer, path)
    return trainer


__all__ = ["load_checkpoint", "save_checkpoint", "state_path", "write_current"]
