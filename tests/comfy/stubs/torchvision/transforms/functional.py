"""Test-only stand-in for torchvision.transforms.functional: the names spandrel imports at module level.

spandrel (which ComfyUI needs for its upscale-model loader, and the frontend for its model combos) imports
these when it loads; the tests never run an upscale model, so calling one is an error that says so.
"""

import enum


class InterpolationMode(enum.Enum):
    """The members spandrel refers to."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _not_in_the_stub(*args, **kwargs):
    raise NotImplementedError("torchvision is a test-only stub here: install torchvision to run this model")


rotate = _not_in_the_stub
normalize = _not_in_the_stub
