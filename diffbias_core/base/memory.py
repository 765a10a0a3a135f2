"""Memory a step will need, said before it allocates: estimates, the memory this machine has, a clear refusal."""

from __future__ import annotations

import math
import os
import shutil


def format_bytes(count: float) -> str:
    """``1536`` -> ``1.5 KiB``; binary units up to TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def available_memory() -> int | None:
    """Bytes that can still be allocated without failing: MemAvailable + SwapFree from /proc/meminfo (Linux);
    None where that is not known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            fields = dict(line.split(":", 1) for line in file if ":" in line)
        return sum(
            int(fields[key].split()[0]) * 1024 for key in ("MemAvailable", "SwapFree") if key in fields
        )
    except (OSError, ValueError):
        return None


def check_fits(needed: int, what: str) -> None:
    """Raise MemoryError saying what needs how much, before allocating ``needed`` bytes that are not there."""
    free = available_memory()
    if free is not None and needed > free:
        raise MemoryError(
            f"{what} needs {format_bytes(needed)} of memory, but only {format_bytes(free)} is available; "
            "free memory or make it smaller"
        )


def free_disk(folder: str | os.PathLike) -> int | None:
    """Free bytes on the disk of ``folder`` (or of its nearest existing parent); None where that is not known."""
    place = os.path.abspath(folder)
    while not os.path.isdir(place) and os.path.dirname(place) != place:
        place = os.path.dirname(place)
    try:
        return shutil.disk_usage(place).free
    except OSError:
        return None


def check_disk_fits(needed: int, folder: str | os.PathLike, what: str) -> None:
    """Raise OSError saying what needs how much, before writing ``needed`` bytes into ``folder`` that has not
    that much free space (a folder that does not exist yet: its nearest existing parent)."""
    free = free_disk(folder)
    if free is not None and needed > free:
        raise OSError(
            f"{what} needs {format_bytes(needed)} of disk in {folder}, but only {format_bytes(free)} is free; "
            "free disk space or make it smaller"
        )


def activation_bytes(images: int, steps: int, row_shape: tuple[int, ...], itemsize: int = 4) -> int:
    """Bytes of one recorded activation per image and step: images * steps * prod(row_shape) * itemsize."""
    return images * steps * math.prod(row_shape) * itemsize


__all__ = [
    "activation_bytes",
    "available_memory",
    "check_disk_fits",
    "check_fits",
    "format_bytes",
    "free_disk",
]
