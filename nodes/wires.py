"""The plugin's wire types. Their ids (``DIFFBIAS_SAE``, ``DIFFBIAS_FEATURES``) are a public API.

* ``DIFFBIAS_SAE`` carries a :class:`SaeWire`: a handle on the SAE (weights read on demand) and the file it
  came from (feature sets are saved beside it).
* ``DIFFBIAS_FEATURES`` carries a ``diffbias_core.FeatureSet``.
* ``DIFFBIAS_CLASSIFIER`` carries any object of the ``diffbias_core.measure.ImageClassifier`` protocol
  (``classes``, ``name``, ``probabilities(images)``; optional ``groups``, ``readable``, ``embed``): a linear
  probe on vision embeddings (Train/Load Bias Classifier) or the toy world's exact oracles. It never reads
  the hook activation an intervention edits.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..diffbias_core import SparseAutoencoder
from ..diffbias_core.sae.lazy import SaeHandle

SaeType = io.Custom("DIFFBIAS_SAE")
FeaturesType = io.Custom("DIFFBIAS_FEATURES")
ClassifierType = io.Custom("DIFFBIAS_CLASSIFIER")


class SaeWire:
    """Value of a DIFFBIAS_SAE wire: an SAE known by its file, its weights read when a node needs them.

    Load Bias SAE gives a handle on the file (header only); ``sae`` loads the whole SAE on first use (Train,
    Attribute, Save and Measure need it) and keeps it; Apply Feature Intervention asks the handle for the
    decoder rows an encoder-free edit reads. Never modified by the nodes that receive it.
    """

    __slots__ = ("handle", "path")

    def __init__(self, sae: SparseAutoencoder | SaeHandle, path: str) -> None:
        self.handle: SaeHandle = sae if isinstance(sae, SaeHandle) else SaeHandle.of(sae)
        """The SAE's facts (sizes, hook, family, fingerprint) and its weights on demand."""
        self.path = path
        """Absolute path of the file (or layout weight file) it was loaded from or saved to."""

    @property
    def sae(self) -> SparseAutoencoder:
        """The whole SAE (on the CPU, in its file's dtype), loaded on first use."""
        return self.handle.load()

    def __repr__(self) -> str:
        return f"SaeWire({self.path!r}, loaded={self.handle.is_loaded})"


def describe_sae(sae: SparseAutoencoder | SaeHandle) -> str:
    """One line: width, latents, k, kernel, hook and family."""
    kernel = f", kernel {sae.kernel_size}x{sae.kernel_size}" if sae.kernel_size > 1 else ""
    return (
        f"width {sae.d_in}, {sae.num_latents} latents, k {sae.k}{kernel}, hook {sae.hook}, "
        f"family {sae.model_family}"
    )


__all__ = ["ClassifierType", "FeaturesType", "SaeType", "SaeWire", "describe_sae"]
