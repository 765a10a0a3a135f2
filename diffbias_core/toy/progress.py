"""A minimal progress bar on stderr (no dependency). Silent when ``enabled`` is False."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "stage") as bar: bar.update(n)`` draws ``stage [#####.....] 50% 3.2s``."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = max(int(total), 1)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.done = min(self.done, self.total)
        self._draw(force=True)
        if self.enabled:
            (self.stream or sys.stderr).write("\n")

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return time.perf_counter() - self.start

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` units."""
        self.done += n
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.2 and self.done < self.total:
            return
        self._last_draw = now
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        stream = self.stream or sys.stderr
        stream.write(f"\r{self.desc:<22} [{bar}] {100 * frac:5.1f}% {self.elapsed:6.1f}s")
        stream.flush()


__all__ = ["Progress"]
