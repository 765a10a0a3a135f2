"""ComfyUI nodes of diffbias: thin adapters from widgets to ``diffbias_core``.

The only package that imports ComfyUI. ``comfy_entrypoint`` registers the ``models/sae`` folder and
returns the extension listing every node.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

try:
    import diffbias_core  # noqa: F401
except ModuleNotFoundError as error:  # the plugin folder was cloned but not installed
    raise ModuleNotFoundError(
        "diffbias: the 'diffbias_core' library is not installed in ComfyUI's Python; run "
        "'pip install -e <ComfyUI>/custom_nodes/<this folder>' with that Python, then restart ComfyUI",
        name=error.name,
    ) from error

from . import files
from .apply import ApplyIntervention
from .attribute import AttributeFeatures
from .feature_files import LoadFeatures, PreviewFeatures, SaveFeatures
from .load_sae import LoadSAE
from .train_sae import TrainSAE

NODES: list[type[io.ComfyNode]] = [
    LoadSAE,
    TrainSAE,
    AttributeFeatures,
    ApplyIntervention,
    SaveFeatures,
    LoadFeatures,
    PreviewFeatures,
]


class DiffBiasExtension(ComfyExtension):
    """The diffbias node set."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> DiffBiasExtension:
    """ComfyUI's V3 entry point: one-time setup (the ``sae`` model folder), then the extension."""
    files.register_folder()
    return DiffBiasExtension()


__all__ = ["NODES", "DiffBiasExtension", "comfy_entrypoint"]
