"""Cancel a node's run the way a user does, at a chosen point of its progress bar (inside a ComfyUI process).

ComfyUI's Cancel raises the interrupt flag; nodes see it at their next check. Raising it from the global
progress-bar hook when the bar passes ``value`` picks a phase of a node that reports its phases on one bar
(Train Bias SAE: one unit per sampling step, then its training share).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def interrupt_when_progress_passes(value: int) -> Iterator[list[int]]:
    """Raise ComfyUI's interrupt flag once a progress bar made in the block reports more than ``value``.

    Yields the list of values reported (for messages). The flag and the previous hook are restored after.
    """
    import comfy.model_management
    import comfy.utils

    seen: list[int] = []

    def hook(current, total, preview=None, node_id=None) -> None:
        seen.append(int(current))
        if current > value:
            comfy.model_management.interrupt_current_processing(True)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield seen
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
