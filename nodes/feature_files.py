"""Save / Load / Preview bias features: feature-set files beside their SAE in ``models/sae``."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..diffbias_core import load_features, save_features
from ..diffbias_core.attribute.features import probe_accuracy
from . import files
from .charts import feature_chart, features_report
from .wires import FeaturesType, SaeType, SaeWire


class SaveFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasSaveFeatures",
            display_name="Save Bias Features (DiffBias)",
            category="diffbias/features",
            description="Writes a feature set to <name>.features.safetensors in the folder of the SAE it was "
            "found on, so that Load Bias Features lists it. Refuses an SAE the features do not "
            "belong to.",
            is_output_node=True,
            inputs=[
                FeaturesType.Input(
                    "features", tooltip="The feature set to save (from Attribute Bias Features)."
                ),
                SaeType.Input("sae", tooltip="The SAE the features were found on; the file goes beside it."),
                io.String.Input(
                    "file_name",
                    default="bias_features",
                    tooltip="File name without folder; '.features.safetensors' is appended. An "
                    "existing file of that name is replaced.",
                ),
            ],
            outputs=[
                io.String.Output("path", display_name="path", tooltip="Full path of the written file."),
            ],
        )

    @classmethod
    def execute(cls, features, sae: SaeWire, file_name: str) -> io.NodeOutput:
        features.check_matches(sae.handle)  # the fingerprint, not the weights
        path = files.features_path(sae.path, file_name)
        save_features(features, path)
        return io.NodeOutput(path, ui=ui.PreviewText(f"saved {files.display_name(path)}"))


class LoadFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasLoadFeatures",
            display_name="Load Bias Features (DiffBias)",
            category="diffbias/features",
            description="Loads a feature set (<name>.features.safetensors) saved beside its SAE in "
            "ComfyUI/models/sae. Apply Feature Intervention checks that it belongs to the SAE.",
            inputs=[
                io.Combo.Input(
                    "features_name",
                    options=files.feature_choices(),
                    tooltip="Feature-set file in ComfyUI/models/sae (saved by Save Bias Features).",
                ),
            ],
            outputs=[
                FeaturesType.Output(
                    "features",
                    display_name="features",
                    tooltip="The feature set: ranked SAE latents per class.",
                ),
                io.String.Output(
                    "classes",
                    display_name="classes",
                    tooltip="Its class names, comma-separated, in label order (the "
                    "order of a target like '1,1').",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, features_name: str) -> bool | str:
        if files.is_shipped(features_name):
            return True
        missing = files.missing_folder_message()
        if missing is not None:
            return missing
        if features_name not in files.feature_choices():
            return (
                f"feature file {features_name!r} is not in the SAE folders {files.sae_folders()}; pick a "
                "listed file or save one with Save Bias Features"
            )
        return True

    @classmethod
    def fingerprint_inputs(cls, features_name: str) -> str:
        try:
            path = files.resolve(features_name, "feature")
            return f"{path}:{os.path.getmtime(path)}"
        except FileNotFoundError:
            return features_name

    @classmethod
    def execute(cls, features_name: str) -> io.NodeOutput:
        features = load_features(files.resolve(features_name, "feature"))
        return io.NodeOutput(features, ",".join(features.classes))


class PreviewFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasPreviewFeatures",
            display_name="Preview Bias Features (DiffBias)",
            category="diffbias/features",
            description="Draws the best features of every class of a feature set with their scores, the "
            "probes' held-out accuracy per step (when the file records it) and warnings: top features "
            "with no score, a feature listed under several classes. The report output says the same in "
            "words (wire it to Preview Any).",
            is_output_node=True,
            inputs=[
                FeaturesType.Input("features", tooltip="The feature set to show."),
                io.Int.Input(
                    "top_k",
                    default=10,
                    min=1,
                    max=200,
                    tooltip="Features shown per class (1-200), best first.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    "chart", display_name="chart", tooltip="Bar chart of the top features' scores per class."
                ),
                io.String.Output(
                    "report",
                    display_name="report",
                    tooltip="The probe test, held-out probe accuracy per step (chance = 1 / classes) and "
                    "warnings about the top features, as text; wire it to Preview Any.",
                ),
            ],
        )

    @classmethod
    def execute(cls, features, top_k: int) -> io.NodeOutput:
        report, warnings = features_report(features, top_k)
        accuracy = [value for _, value in probe_accuracy(features) if value == value]
        chart = feature_chart(features, top_k, accuracy=accuracy or None, notes=warnings)
        return io.NodeOutput(chart, report, ui=ui.PreviewImage(chart, cls=cls))
