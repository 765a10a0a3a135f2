"""Memory a step will need, said before it allocates: estimates, the memory this machine has, a clear refusal."""

from __future__ import annotations

import math


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
        return sum(int(fields[key].split()[0]) * 1024 for key in ("MemAvailable", "SwapFree") if key in fields)
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


def activation_bytes(images: int, steps: int, row_shape: tuple[int, ...], itemsize: int = 4) -> int:
    """Bytes of one recorded activation per image and step: images * steps * prod(row_shape) * itemsize."""
    return images * steps * math.prod(row_shape) * itemsize


__all__ = ["activation_bytes", "available_memory", "check_fits", "format_bytes"]
