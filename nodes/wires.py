"""The plugin's wire types. Their ids (``DIFFBIAS_SAE``, ``DIFFBIAS_FEATURES``) are a public API.

* ``DIFFBIAS_SAE`` carries a :class:`SaeWire`: the SAE and the file it came from (feature sets are saved
  beside it).
* ``DIFFBIAS_FEATURES`` carries a ``diffbias_core.FeatureSet``.
* ``DIFFBIAS_CLASSIFIER`` carries any object of the ``diffbias_core.measure.ImageClassifier`` protocol
  (``classes``, ``name``, ``probabilities(images)``; optional ``groups``, ``readable``, ``embed``): a linear
  probe on vision embeddings (Train/Load Bias Classifier) or the toy world's exact oracles. It never reads
  the hook activation an intervention edits.
"""

from __future__ import annotations

from typing import NamedTuple

from comfy_api.latest import io

from ..diffbias_core import SparseAutoencoder

SaeType = io.Custom("DIFFBIAS_SAE")
FeaturesType = io.Custom("DIFFBIAS_FEATURES")
ClassifierType = io.Custom("DIFFBIAS_CLASSIFIER")


class SaeWire(NamedTuple):
    """Value of a DIFFBIAS_SAE wire."""

    sae: SparseAutoencoder
    """The SAE (on the CPU, in its file's dtype). Never modified by the nodes that receive it."""
    path: str
    """Absolute path of the file (or layout weight file) it was loaded from or saved to."""


def describe_sae(sae: SparseAutoencoder) -> str:
    """One line: width, latents, k, kernel, hook and family."""
    kernel = f", kernel {sae.kernel_size}x{sae.kernel_size}" if sae.kernel_size > 1 else ""
    return (
        f"width {sae.d_in}, {sae.num_latents} latents, k {sae.k}{kernel}, hook {sae.hook}, "
        f"family {sae.model_family}"
    )


__all__ = ["ClassifierType", "FeaturesType", "SaeType", "SaeWire", "describe_sae"]
