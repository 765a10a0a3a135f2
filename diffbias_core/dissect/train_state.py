"""Resumable training checkpoints: a native SAE file plus a state sidecar.

``CKPT.safetensors`` is an ordinary native SAE file (the current weights; any tool loads it) and
``CKPT.state.safetensors`` holds what resuming needs: Adam moments, the best weights so far, the firing
counters, the shuffle buffer and generator, the counters and the config. Both are written atomically, the
sidecar first; the sidecar alone holds everything a resume needs (the current weights included), so a
crash between the two writes loses nothing: resuming continues from the sidecar and rewrites the SAE file.
Resuming a single process continues bit-identically to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from os import PathLike
from pathlib import Path

import torch

from ..sae.formats import FormatError, check_metadata_version, read_safetensors, save_sae, write_safetensors
from . import distributed as ddp
from .train import SaeTrainer, TrainConfig

STATE_FORMAT = "diffbias.train_state"
STATE_VERSION = 1
logger = logging.getLogger(__name__)
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
_RUN_FIELDS = ("step", "rows", "skipped", "fvu", "l0", "auxk", "lr", "best_fvu", "variance")


def state_path(path: str | PathLike[str]) -> Path:
    """The sidecar of checkpoint ``path``: ``X.safetensors`` -> ``X.state.safetensors``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.state{path.suffix or '.safetensors'}")


def write_current(trainer: SaeTrainer, path: str | PathLike[str]) -> None:
    """Write the trainer's current weights as a native SAE file (atomically)."""
    current = trainer.sae.copy_to()
    current.provenance = trainer.provenance()
    save_sae(current, path)


def save_checkpoint(
    trainer: SaeTrainer, path: str | PathLike[str], extra: dict[str, str] | None = None
) -> None:
    """Write a resumable checkpoint (process 0 only). ``extra``: strings to keep (e.g. a data position)."""
    if ddp.world()[0] != 0:
        return
    trainer.run.extra = {**trainer.run.extra, **(extra or {})}
    tensors = {f"param.{name}": p.detach() for name, p in zip(_PARAMS, trainer.params, strict=True)}
    for name, p in zip(_PARAMS, trainer.params, strict=True):
        for key, value in trainer.optimizer.state.get(p, {}).items():
            tensors[f"adam.{name}.{key}"] = value.detach().reshape(-1) if key == "step" else value.detach()
    if trainer.best is not None:
        tensors.update({f"best.{name}": getattr(trainer.best, name).detach() for name in _PARAMS})
    tensors["rows_since_fired"] = trainer.rows_since_fired
    tensors["generator"] = trainer.generator.get_state()
    if trainer.buffer is not None and trainer.fill:
        tensors["buffer"] = trainer.buffer[: trainer.fill]
    sae, run = trainer.sae, trainer.run
    metadata = {
        "format": STATE_FORMAT, "format_version": str(STATE_VERSION),
        "config": json.dumps(dataclasses.asdict(trainer.config)), "d_in": str(sae.d_in),
        "kernel_size": str(sae.kernel_size), "hook": sae.hook, "model_family": sae.model_family,
        "run": json.dumps({name: getattr(run, name) for name in _RUN_FIELDS}),
        "initialized": str(run.initialized), "extra": json.dumps(run.extra),
    }  # fmt: skip
    write_safetensors(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata, state_path(path)
    )
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
    recorded = TrainConfig(**json.loads(metadata["config"]))
    config = config or recorded
    if (config.num_latents, config.k) != (recorded.num_latents, recorded.k):
        raise ValueError(
            f"{sidecar}: trained with num_latents {recorded.num_latents}, k {recorded.k}; cannot continue with "
            f"num_latents {config.num_latents}, k {config.k}"
        )
    trainer = SaeTrainer(config, int(metadata["d_in"]), kernel_size=int(metadata["kernel_size"]),
                         hook=metadata["hook"], model_family=metadata["model_family"], device=device,
                         progress=progress)  # fmt: skip
    run = json.loads(metadata["run"])
    from ..sae.formats import sae_metadata

    try:
        saved_steps = json.loads(sae_metadata(path).get("provenance", "{}")).get("steps")
    except (FormatError, ValueError):
        saved_steps = None  # missing or damaged: the sidecar has the weights, the file is rewritten below
    dev = trainer.sae.device
    with torch.no_grad():
        for name, p in zip(_PARAMS, trainer.params, strict=True):
            p.copy_(tensors[f"param.{name}"])
            state = {key.rsplit(".", 1)[1]: value.to(dev) for key, value in tensors.items()
                     if key.startswith(f"adam.{name}.")}  # fmt: skip
            if state:
                state["step"] = state["step"].reshape(()).cpu()
                trainer.optimizer.state[p] = state
        if "best.W_dec" in tensors:
            trainer.best = trainer.sae.copy_to()
            for name in _PARAMS:
                getattr(trainer.best, name).copy_(tensors[f"best.{name}"])
        trainer.rows_since_fired.copy_(tensors["rows_since_fired"])
    for name in _RUN_FIELDS:
        if name in run:  # checkpoints of older versions lack the newer fields: they keep their defaults
            setattr(trainer.run, name, type(getattr(trainer.run, name))(run[name]))
    trainer.run.initialized = metadata["initialized"] == "True"
    trainer.run.extra = json.loads(metadata.get("extra", "{}"))
    if ddp.world()[0] == 0:
        trainer.generator.set_state(tensors["generator"])
        if "buffer" in tensors:
            rows = tensors["buffer"]
            trainer.buffer = torch.empty(trainer.capacity, trainer.sae.n_in, device=dev)
            trainer.fill = min(rows.shape[0], trainer.capacity)
            trainer.buffer[: trainer.fill] = rows[: trainer.fill].to(dev)
    if saved_steps != str(run["step"]) and ddp.world()[0] == 0:
        logger.warning("%s is at step %s but %s at %d (a checkpoint write was interrupted); resuming from the "
                       "state and rewriting the SAE file from it", path, saved_steps, sidecar.name, run["step"])  # fmt: skip
        write_current(trainer, path)
    return trainer


__all__ = ["load_checkpoint", "save_checkpoint", "state_path", "write_current"]
