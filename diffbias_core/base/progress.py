"""A minimal progress bar on stderr (no dependency). Silent when ``enabled`` is False.

On a terminal the bar is redrawn in place a few times a second; into a file or pipe (a log) it writes
one line every ``LOG_INTERVAL`` seconds instead, so logs of long runs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

TERMINAL_INTERVAL = 0.2
"""Seconds between redraws on a terminal."""
LOG_INTERVAL = 30.0
"""Seconds between lines when the stream is not a terminal."""


class Cancelled(Exception):
    """A long computation stopped because its ``should_stop`` callback returned True."""


def check_stop(should_stop: Callable[[], bool] | None) -> None:
    """Raise :class:`Cancelled` when ``should_stop`` is given and returns True (the loops of the core poll it)."""
    if should_stop is not None and should_stop():
        raise Cancelled("stopped on request")


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
        self._drawn_done: int | None = None
        target = stream or sys.stderr
        self._terminal = bool(getattr(target, "isatty", lambda: False)())

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.done = min(self.done, self.total)
        self._draw(force=True)
        if self.enabled and self._terminal:
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
        interval = TERMINAL_INTERVAL if self._terminal else LOG_INTERVAL
        if not force and now - self._last_draw < interval and self.done < self.total:
            return
        if self.done == self._drawn_done:
            return  # nothing new to show (e.g. the closing draw right after reaching the total)
        self._last_draw = now
        self._drawn_done = self.done
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        stream = self.stream or sys.stderr
        line = f"{self.desc:<22} [{bar}] {100 * frac:5.1f}% {self.elapsed:6.1f}s"
        stream.write(f"\r{line}" if self._terminal else f"{line}\n")
        stream.flush()


__all__ = ["Progress"]
