"""The synthetic world of the embedded demo: one light coloured shape on a dark grey background.

A prompt names a shape and may name a colour. When it names no colour, the colour (the protected
attribute) follows a per-shape skew, e.g. "circle" is red 85% of the time. Positions, sizes, colour
shades and backgrounds vary. Everything is rendered with exact pixel rules in torch, batched.

Images are float tensors in [-1, 1], shape (B, 3, S, S).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape names in label order."""
COLOURS: tuple[str, ...] = ("red", "green", "blue")
"""Colour names (the protected attribute) in label order."""
VOCAB: tuple[str, ...] = ("<none>", *COLOURS, *SHAPES)
"""Prompt vocabulary: token 0 means "no colour named"."""
PROMPT_LENGTH = 2
"""Tokens per prompt: (colour or <none>, shape)."""

DEFAULT_SKEW: tuple[tuple[float, ...], ...] = (
    (0.85, 0.10, 0.05),  # circle: mostly red
    (0.10, 0.15, 0.75),  # square: mostly blue
    (0.15, 0.70, 0.15),  # triangle: mostly green
)
"""Colour probabilities per shape (rows: SHAPES, columns: COLOURS) for prompts that name no colour."""

# Light shapes on dark grounds: foreground minus background shares a large common (brightness) part
# across colours, so where a shape goes does not depend on which colour it gets.
_BASE_RGB = torch.tensor([[0.95, 0.5, 0.5], [0.5, 0.95, 0.5], [0.5, 0.5, 0.95]])  # (colours, 3) in [0, 1]


def _check_skew(skew: tuple[tuple[float, ...], ...]) -> None:
    if len(skew) != len(SHAPES) or any(len(row) != len(COLOURS) for row in skew):
        raise ValueError(f"skew must have {len(SHAPES)} rows of {len(COLOURS)} probabilities, got {skew!r}")
    for shape, row in zip(SHAPES, skew, strict=True):
        if any(p < 0 for p in row) or abs(sum(row) - 1.0) > 1e-6:
            raise ValueError(f"skew row for {shape!r} must be probabilities summing to 1, got {row!r}")


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn."""

    image_size: int = 16
    """Side of the square image in pixels (>= 12)."""
    min_size: float = 8.0
    """Smallest shape extent (diameter / side / base) in pixels."""
    max_size: float = 13.0
    """Largest shape extent in pixels (<= image_size - 2)."""
    skew: tuple[tuple[float, ...], ...] = field(default=DEFAULT_SKEW)
    """Per-shape colour probabilities when the prompt names no colour (rows SHAPES, columns COLOURS)."""
    named_colour_rate: float = 0.5
    """Fraction of prompts that name the colour; named colours are drawn uniformly."""
    colour_jitter: float = 0.05
    """Uniform per-channel jitter of the shape colour, in [0, 0.1]."""

    def __post_init__(self) -> None:
        if self.image_size < 12:
            raise ValueError(f"image_size must be >= 12, got {self.image_size}")
        if not 4.0 <= self.min_size <= self.max_size <= self.image_size - 2:
            raise ValueError(
                f"need 4 <= min_size <= max_size <= image_size - 2 ({self.image_size - 2}), "
                f"got min_size={self.min_size}, max_size={self.max_size}"
            )
        _check_skew(self.skew)
        if not 0.0 <= self.named_colour_rate <= 1.0:
            raise ValueError(f"named_colour_rate must be in [0, 1], got {self.named_colour_rate}")
        if not 0.0 <= self.colour_jitter <= 0.1:
            raise ValueError(f"colour_jitter must be in [0, 0.1], got {self.colour_jitter}")


class Scenes(NamedTuple):
    """A batch of scene parameters (all tensors have leading dim B)."""

    shape: Tensor
    """(B,) int64 index into SHAPES."""
    colour: Tensor
    """(B,) int64 index into COLOURS."""
    named: Tensor
    """(B,) bool: the prompt names the colour."""
    centre: Tensor
    """(B, 2) float (x, y) centre in pixels."""
    size: Tensor
    """(B,) float extent in pixels."""
    background: Tensor
    """(B, 2) float grey levels in [0, 0.35] at the top and bottom edge (a vertical gradient)."""
    rgb: Tensor
    """(B, 3) float shape colour in [0, 1]."""


def skew_from_majority(majority: float) -> tuple[tuple[float, ...], ...]:
    """A skew where every shape's default majority colour has probability ``majority``.

    The majority colours are those of DEFAULT_SKEW (circle red, square blue, triangle green);
    the rest is split evenly. ``majority`` in [1/3, 1].
    """
    n = len(COLOURS)
    if not 1.0 / n - 1e-9 <= majority <= 1.0:
        raise ValueError(f"bias (majority colour probability) must be in [{1 / n:.3f}, 1], got {majority}")
    rest = (1.0 - majority) / (n - 1)
    rows = []
    for row in DEFAULT_SKEW:
        top = max(range(n), key=lambda c: row[c])
        rows.append(tuple(majority if c == top else rest for c in range(n)))
    return tuple(rows)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def sample_scenes(
    config: WorldConfig,
    shape: Tensor,
    generator: torch.Generator,
    colour: Tensor | None = None,
) -> Scenes:
    """Draw scenes for the given shapes.

    shape: (B,) int64. colour: (B,) int64, or None to draw it from the skew (the prompt then names
    no colour). Everything else (centre, size, shade, background) is drawn from ``generator``.
    """
    n = shape.shape[0]
    if colour is None:
        probs = torch.tensor(config.skew, dtype=torch.float64)[shape]  # (B, colours)
        colour = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        named = torch.zeros(n, dtype=torch.bool)
    else:
        named = torch.ones(n, dtype=torch.bool)
    size = _uniform(n, config.min_size, config.max_size, generator)
    room = config.image_size - size  # free pixels along each axis
    centre = torch.stack([size / 2 + room * torch.rand(n, generator=generator) for _ in range(2)], dim=1)
    background = torch.stack([_uniform(n, 0.0, 0.35, generator) for _ in range(2)], dim=1)
    jitter = (torch.rand(n, 3, generator=generator) * 2 - 1) * config.colour_jitter
    rgb = (_BASE_RGB[colour] + jitter).clamp(0, 1)
    return Scenes(shape.long(), colour.long(), named, centre, size, background, rgb)


def sample_training_scenes(config: WorldConfig, n: int, generator: torch.Generator) -> Scenes:
    """Scenes as the training data sees them: uniform shapes; colour named at ``named_colour_rate``
    (then uniform), otherwise drawn from the skew."""
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    skewed = sample_scenes(config, shape, generator)
    named = torch.rand(n, generator=generator) < config.named_colour_rate
    uniform_colour = torch.randint(len(COLOURS), (n,), generator=generator)
    colour = torch.where(named, uniform_colour, skewed.colour)
    jitter = skewed.rgb - _BASE_RGB[skewed.colour]
    rgb = (_BASE_RGB[colour] + jitter).clamp(0, 1)
    return skewed._replace(colour=colour, named=named, rgb=rgb)


def shape_masks(shape: Tensor, centre: Tensor, size: Tensor, image_size: int) -> Tensor:
    """Exact pixel-centre masks. shape: (B,), centre: (B, 2) (x, y), size: (B,) -> (B, S, S) bool.

    circle: diameter ``size``; square: side ``size`` (axis aligned); triangle: upward isosceles
    with base and height ``size``.
    """
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5
    x = coords.view(1, 1, -1) - centre[:, 0].view(-1, 1, 1)  # (B, 1, S)
    y = coords.view(1, -1, 1) - centre[:, 1].view(-1, 1, 1)  # (B, S, 1)
    half = (size / 2).view(-1, 1, 1)
    circle = x.pow(2) + y.pow(2) <= half.pow(2)
    square = (x.abs() <= half) & (y.abs() <= half)
    # triangle: apex at y = -half, base at y = +half; half-width grows linearly from 0 to half.
    triangle = (y.abs() <= half) & (x.abs() <= (y + half) / 2)
    masks = torch.stack([circle, square, triangle], dim=1)  # (B, shapes, S, S)
    return masks[torch.arange(shape.shape[0]), shape]


def render(scenes: Scenes, image_size: int) -> Tensor:
    """Scenes -> images (B, 3, S, S) float32 in [-1, 1]."""
    mask = shape_masks(scenes.shape, scenes.centre, scenes.size, image_size)  # (B, S, S)
    ramp = torch.linspace(0, 1, image_size).view(1, -1, 1)  # (1, S, 1)
    grey = scenes.background[:, :1, None] * (1 - ramp) + scenes.background[:, 1:, None] * ramp  # (B, S, 1)
    grey = grey.expand(-1, -1, image_size).unsqueeze(1)  # (B, 1, S, S)
    image = torch.where(mask.unsqueeze(1), scenes.rgb.view(-1, 3, 1, 1), grey)  # (B, 3, S, S)
    return image * 2 - 1


def tokens(shape: Tensor, colour: Tensor | None = None) -> Tensor:
    """Prompt tokens. shape: (B,) int64; colour: (B,) int64 with -1 = not named, or None.

    Returns (B, PROMPT_LENGTH) int64 ids into VOCAB.
    """
    colour_tok = torch.zeros_like(shape) if colour is None else torch.where(colour >= 0, colour + 1, 0)
    return torch.stack([colour_tok, shape + 1 + len(COLOURS)], dim=1)


def prompt_text(shape: int, colour: int | None = None) -> str:
    """Human-readable prompt: "a circle", "a red circle"."""
    words = [COLOURS[colour]] if colour is not None and colour >= 0 else []
    return " ".join(["a", *words, SHAPES[shape]])


def parse_prompt(text: str) -> Tensor:
    """Prompt text -> (PROMPT_LENGTH,) int64 tokens. Raises ValueError on unknown words."""
    words = [w for w in text.lower().replace(",", " ").split() if w not in ("a", "an", "the", "of", "photo")]
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    unknown = [w for w in words if w not in COLOURS and w not in SHAPES]
    if unknown or len(shapes) != 1 or len(colours) > 1:
        raise ValueError(
            f"prompt {text!r}: expected one shape of {SHAPES} and at most one colour of {COLOURS}, "
            f"found shapes {shapes}, colours {colours}, unknown words {unknown}"
        )
    colour = torch.tensor([COLOURS.index(colours[0]) if colours else -1])
    return tokens(torch.tensor([SHAPES.index(shapes[0])]), colour)[0]


__all__ = [
    "COLOURS",
    "DEFAULT_SKEW",
    "PROMPT_LENGTH",
    "SHAPES",
    "VOCAB",
    "Scenes",
    "WorldConfig",
    "parse_prompt",
    "prompt_text",
    "render",
    "sample_scenes",
    "sample_training_scenes",
    "shape_masks",
    "skew_from_majority",
    "tokens",
]
