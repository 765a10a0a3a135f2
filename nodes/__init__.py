"""ComfyUI nodes of diffbias: thin adapters from widgets to ``diffbias_core``.

The only package that imports ComfyUI. ``comfy_entrypoint`` registers the ``models/sae`` and
``models/diffbias_classifiers`` folders and returns the extension listing every node. The core is imported from the plugin folder itself
(``..diffbias_core``), so a plain clone into ``custom_nodes/`` works without installing the package.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import files
from .apply import ApplyIntervention
from .attribute import AttributeFeatures
from .calibrate import CalibrateIntervention
from .classifiers import LoadClassifier, SaveClassifier, TrainClassifier, TrainClassifierFromImages
from .feature_files import LoadFeatures, PreviewFeatures, SaveFeatures
from .load_sae import LoadSAE
from .measure import MeasureBias
from .toy_nodes import LoadToyWorld, ToyWorldOracle
from .train_sae import TrainSAE

NODES: list[type[io.ComfyNode]] = [
    LoadToyWorld,
    ToyWorldOracle,
    LoadSAE,
    TrainSAE,
    AttributeFeatures,
    ApplyIntervention,
    SaveFeatures,
    LoadFeatures,
    PreviewFeatures,
    TrainClassifier,
    TrainClassifierFromImages,
    SaveClassifier,
    LoadClassifier,
    MeasureBias,
    CalibrateIntervention,
]


class DiffBiasExtension(ComfyExtension):
    """The diffbias node set."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> DiffBiasExtension:
    """ComfyUI's V3 entry point: one-time setup (the ``sae`` model folder), then the extension."""
    files.register_folder()
    files.register_classifier_folder()
    return DiffBiasExtension()


__all__ = ["NODES", "DiffBiasExtension", "comfy_entrypoint"]
