"""The toy world's exact oracles as an image classifier (the interface the Measure Bias node reads).

``classes``/``name``/``probabilities`` plus ``groups`` and ``readable``: one-hot rows from the pixel
rules of ``oracles.read``, on pictures in ComfyUI's IMAGE layout read back at the world's size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .display import picture_to_world
from .oracles import Reading, read
from .world import COLOURS, SHAPES

Attribute = Literal["colour", "shape"]


class ToyOracle:
    """Exact classifier of the toy world: the colour (groups: the shape) or the shape (groups: the colour).

    images: (B, H, W, 3) float in [0, 1], any H and W (pictures 8x the world's 16 pixels are read exactly).
    """

    def __init__(self, attribute: Attribute = "colour", image_size: int = 16) -> None:
        if attribute not in ("colour", "shape"):
            raise ValueError(f"the toy oracle reads 'colour' or 'shape', not {attribute!r}")
        self.attribute = attribute
        self.image_size = image_size
        self.classes: tuple[str, ...] = COLOURS if attribute == "colour" else SHAPES
        self._group_names: tuple[str, ...] = SHAPES if attribute == "colour" else COLOURS
        self.name = f"toy world oracle ({attribute}, exact pixel rules)"
        self._last: tuple[Tensor, Reading] | None = None

    def read(self, images: Tensor) -> Reading:
        """The oracles' full reading (colour, shape, mask) of ComfyUI pictures (B, H, W, 3).

        The reading of the last batch is kept, so that probabilities, groups and readable on the same
        tensor read it once.
        """
        if self._last is None or self._last[0] is not images:
            self._last = (images, read(picture_to_world(images, self.image_size)))
        return self._last[1]

    def _labels(self, reading: Reading) -> tuple[Tensor, Tensor]:
        """(class labels, group labels), each (B,) int64 with -1 = unreadable."""
        if self.attribute == "colour":
            return reading.colour, reading.shape
        return reading.shape, reading.colour

    def probabilities(self, images: Tensor) -> Tensor:
        """(B, classes) float32 on the CPU: one-hot rows, uniform where nothing could be read."""
        labels, _ = self._labels(self.read(images))
        probs = torch.full((labels.shape[0], len(self.classes)), 1.0 / len(self.classes))
        known = labels >= 0
        probs[known] = torch.nn.functional.one_hot(labels[known], len(self.classes)).float()
        return probs

    def groups(self, images: Tensor) -> tuple[tuple[str, ...], Tensor]:
        """(group names, (B,) int64 group per image, -1 = unreadable): the shape when reading the colour."""
        _, groups = self._labels(self.read(images))
        return self._group_names, groups.cpu()

    def readable(self, images: Tensor) -> Tensor:
        """(B,) bool: a foreground large enough to read was found."""
        return self.read(images).colour.cpu() >= 0


__all__ = ["ToyOracle"]
