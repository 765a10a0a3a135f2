"""FeatureSet: the bias features of an SAE, ranked per class."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class FeatureSet:
    """Ranked SAE latents per class, tied to the SAE they index."""

    classes: tuple[str, ...]
    """Class names in label order, e.g. ("male", "female"); at least two, unique."""
    ids: tuple[Tensor, ...]
    """Per class: (n_c,) int64 latent ids, best first."""
    scores: tuple[Tensor, ...]
    """Per class: (n_c,) float32 attribution scores, same order as ``ids`` (descending)."""
    sae_fingerprint: str
    """``SparseAutoencoder.fingerprint()`` of the SAE whose latents ``ids`` index."""
    hook: str
    """Hook point of that SAE (``unet.middle``, ...)."""
    method: str
    """How the ranking was made: ``ig``, ``mean-diff``, ``random``, ..."""
    provenance: Mapping[str, str] = field(default_factory=dict)
    """Free-form string facts: prompts, steps, seed, samples, baseline, ..."""
