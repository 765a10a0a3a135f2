"""Load Bias SAE: an SAE from ComfyUI's ``models/sae`` folder."""

from __future__ import annotations

import logging
import os

from comfy_api.latest import io, ui

from ..diffbias_core.base.memory import format_bytes
from ..diffbias_core.sae.lazy import open_sae
from . import files
from .model_info import parse_hook
from .wires import SaeType, SaeWire, describe_sae

logger = logging.getLogger(__name__)


class LoadSAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasLoadSAE",
            display_name="Load Bias SAE (DiffBias)",
            category="diffbias/sae",
            description=(
                "Loads a sparse autoencoder (SAE) trained on one hidden layer (hook point) of a diffusion "
                "model from ComfyUI/models/sae: native diffbias files, or published sparsify / SAELens / "
                "DiffLens folders (pick their sae.safetensors or sae_weights.safetensors). Reads only the header: "
                "an add edit later reads just the decoder rows it uses; other nodes load the whole SAE."
            ),
            inputs=[
                io.Combo.Input(
                    "sae_name",
                    options=files.sae_choices(),
                    tooltip="SAE in ComfyUI/models/sae (subfolders included): a native .safetensors file, or a "
                    "published sparsify / SAELens / DiffLens folder (listed as 'name/').",
                ),
                io.String.Input(
                    "hook_override",
                    default="",
                    optional=True,
                    tooltip="Hook point to use instead of the one the file records, e.g. unet.output.1; empty = "
                    "as recorded. Needed for sparsify and SAELens folders, which record none.",
                ),
            ],
            outputs=[
                SaeType.Output(
                    "sae",
                    display_name="sae",
                    tooltip="The SAE, for Attribute Bias Features and Apply Feature Intervention.",
                ),
                io.Int.Output(
                    "width",
                    display_name="width",
                    tooltip="Channel width of the hooked activation (d_in), e.g. 1280 for "
                    "the SD1.5 bottleneck.",
                ),
                io.Int.Output(
                    "latents", display_name="latents", tooltip="Number of SAE latents (dictionary size)."
                ),
                io.Int.Output("k", display_name="k", tooltip="Active latents per code (TopK)."),
                io.String.Output(
                    "hook",
                    display_name="hook",
                    tooltip="Hook point the SAE reads, e.g. unet.middle or dit.double.7.",
                ),
                io.String.Output(
                    "family",
                    display_name="family",
                    tooltip="Model family the SAE was trained on (sd15, sdxl, flux, "
                    "...; unknown for most imported files).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, sae_name: str) -> bool | str:
        if files.is_shipped(sae_name):
            return True
        missing = files.missing_folder_message()
        if missing is not None:
            return missing
        if sae_name not in files.sae_choices():
            return f"SAE {sae_name!r} is not in the SAE folders {files.sae_folders()}; pick a listed file"
        return True

    @classmethod
    def fingerprint_inputs(cls, sae_name: str, hook_override: str = "") -> str:
        try:
            path = files.resolve(sae_name)
            return f"{path}:{os.path.getmtime(path)}:{hook_override}"
        except FileNotFoundError:
            return f"{sae_name}:{hook_override}"

    @classmethod
    def execute(cls, sae_name: str, hook_override: str = "") -> io.NodeOutput:
        path = files.resolve(sae_name)
        override = parse_hook(hook_override).name if hook_override.strip() else None
        size = format_bytes(os.path.getsize(path))
        sae = open_sae(path, hook=override)  # the header only: weights are read when a node needs them
        logger.info("opened SAE %s (%s on disk)", sae_name, size)
        text = f"{sae_name}: {describe_sae(sae)}; {size} on disk, read when an edit or a training needs it"
        return io.NodeOutput(
            SaeWire(sae, path),
            sae.d_in,
            sae.num_latents,
            sae.k,
            sae.hook,
            sae.model_family,
            ui=ui.PreviewText(text),
        )
