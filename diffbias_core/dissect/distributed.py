"""Data-parallel helpers over ``torch.distributed`` (gloo on CPU, nccl on GPU).

Every process trains the same SAE on its own share of the rows; after each backward pass the gradients
(and the per-step statistics) are summed across processes in one ``all_reduce`` and divided by the world
size, exactly what ``DistributedDataParallel`` does, so every process applies the same update and the
parameters stay identical. Launch with ``torchrun --nproc-per-node N -m diffbias_core train-sae ...``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when more than one process takes part."""
    return world()[1] > 1


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1).

    Uses nccl when CUDA is available, gloo otherwise. Returns True when distributed afterwards.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return is_distributed()


def mean_(flat: Tensor) -> Tensor:
    """In-place mean across processes of a flat tensor (a no-op in one process)."""
    rank, size = world()
    if size > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= size
    return flat


def broadcast_(tensors: list[Tensor], src: int = 0) -> None:
    """Copy ``tensors`` from process ``src`` to every process (a no-op in one process)."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor, src)


def all_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only when ``flag`` is True in every process (one tiny all_reduce)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


__all__ = ["all_agree", "broadcast_", "init_from_env", "is_distributed", "mean_", "world"]
