"""Nodes of the embedded toy world: Load Toy World (MODEL, CLIP, VAE) and its exact oracle classifier."""

from __future__ import annotations

from comfy_api.latest import io

from ..diffbias_core.toy.classifier import ToyOracle
from ..diffbias_core.toy.train import load_model
from ..diffbias_core.toy.world import COLOURS, SHAPES, VOCAB
from .toy_world import toy_world
from .wires import ClassifierType


class LoadToyWorld(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasLoadToyWorld",
            display_name="Load Toy World (DiffBias)",
            category="diffbias/toy world",
            description=(
                "The diffusion model shipped with the plugin (no download): 16x16 images of one coloured "
                "shape, trained on a world where the colour is skewed per shape (circle mostly red, square "
                "mostly blue, triangle mostly green) unless the prompt names it. Prompts: 'a circle', 'a red "
                "square'. Sample with an Empty Latent Image of 128x128, KSampler (euler or ddim, scheduler "
                "simple, cfg 1) and VAE Decode; the pictures are 128x128 (8x nearest). Hook point unet.middle "
                "(64x4x4), family toy."
            ),
            inputs=[],
            outputs=[
                io.Model.Output(
                    "MODEL",
                    display_name="MODEL",
                    tooltip="The toy diffusion model (v-prediction, cosine schedule); the scheduler "
                    "'simple' gives the toy's own DDIM grid.",
                ),
                io.Clip.Output(
                    "CLIP",
                    display_name="CLIP",
                    tooltip=f"Its prompt encoder: words {', '.join(VOCAB[1:])} (and a, an, the, of, photo); "
                    "an empty prompt encodes to zeros.",
                ),
                io.Vae.Output(
                    "VAE",
                    display_name="VAE",
                    tooltip="Maps the toy's latent (brightness/chroma, 16x16 for 128x128 px) to RGB pictures "
                    "8x larger, and back.",
                ),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        unet, _ = load_model()
        return io.NodeOutput(*toy_world(unet))


class ToyWorldOracle(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasToyWorldOracle",
            display_name="Toy World Oracle (DiffBias)",
            category="diffbias/toy world",
            description=(
                "The toy world's exact pixel oracles as a classifier for Measure Bias: each picture is read "
                "back at 16x16 (exact for VAE Decode's 8x pictures) and its shape's colour (or its shape) "
                "classified by rule, with the other attribute as the group to condition on."
            ),
            inputs=[
                io.Combo.Input(
                    "attribute",
                    options=["colour", "shape"],
                    default="colour",
                    tooltip=f"colour: classes {', '.join(COLOURS)}, grouped by shape (the protected attribute "
                    f"of the toy world); shape: classes {', '.join(SHAPES)}, grouped by colour.",
                ),
            ],
            outputs=[
                ClassifierType.Output(
                    "classifier",
                    display_name="classifier",
                    tooltip="Exact classifier: one-hot class probabilities, the group of each image, and "
                    "which images were readable (a shape was found).",
                ),
            ],
        )

    @classmethod
    def execute(cls, attribute: str) -> io.NodeOutput:
        return io.NodeOutput(ToyOracle(attribute))  # type: ignore[arg-type]


__all__ = ["LoadToyWorld", "ToyWorldOracle"]
