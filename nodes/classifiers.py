"""Bias classifiers: a linear probe on CLIP vision embeddings, trained in the graph, saved and loaded.

Train Bias Classifier samples every class prompt from the same seeds (the labels come from the prompts) and
fits the probe on ``clip_vision.encode_image(images).image_embeds``; Train Bias Classifier (Labelled Images)
fits it on images a user brings. Files live in ``models/diffbias_classifiers``.
"""

from __future__ import annotations

import comfy.utils
import torch
from comfy_api.latest import io

from ..diffbias_core.measure import (
    EmbeddingClassifier,
    FitConfig,
    fit_probe,
    format_fit,
    load_probe,
    save_probe,
)
from ..diffbias_core.measure.classifier import check_same_model, embed_in_chunks, reference_image
from . import files
from .runs import plan_runs
from .sampling import RunSettings, decode, empty_latent, encode, sample
from .sampling import class_prompts as parse_class_prompts
from .widgets import negative_prompt_input, sampler_inputs, size_inputs
from .wires import ClassifierType

EMBED_CHUNK = 16
"""Images per vision-model call."""


def vision_embedder(clip_vision):
    """images (B, H, W, 3) in [0, 1] -> (B, D) float32 CPU embeddings (``image_embeds``, centre crop)."""
    if clip_vision is None or not hasattr(clip_vision, "encode_image"):
        raise ValueError("the clip_vision input is empty: load a vision model with Load CLIP Vision")

    def embed(images: torch.Tensor) -> torch.Tensor:
        return clip_vision.encode_image(images, crop=True).image_embeds.detach().to("cpu", torch.float32)

    return embed


def describe_vision_model(clip_vision, width: int) -> str:
    """One line naming the vision model by what can be read from it (its file name is not on the wire)."""
    size = getattr(clip_vision, "image_size", "?")
    return f"{type(clip_vision.model).__name__}, {size} px input, {width}-d image embeddings"


def _reference(embed, clip_vision) -> torch.Tensor:
    return embed(reference_image(int(getattr(clip_vision, "image_size", 224))))[0]  # (D,)


def fit_classifier(clip_vision, images, labels, names, holdout: float, seed: int, facts: dict):
    """(classifier, report text) from images (N, H, W, 3) with labels (N,) into ``names``."""
    embed = vision_embedder(clip_vision)
    embeddings = embed_in_chunks(embed, images, EMBED_CHUNK)  # (N, D)
    reference = _reference(embed, clip_vision)
    probe, report = fit_probe(
        embeddings, labels, names, FitConfig(holdout=holdout, seed=seed % 2**63),
        vision_model=describe_vision_model(clip_vision, embeddings.shape[1]),
        reference_embedding=reference, provenance=facts,
    )  # fmt: skip
    return EmbeddingClassifier(probe, embed, chunk=EMBED_CHUNK), format_fit(report, names)


def holdout_input() -> io.Float.Input:
    return io.Float.Input(
        "holdout",
        default=0.25,
        min=0.05,
        max=0.95,
        step=0.05,
        tooltip="Share of each class's images held out to measure the classifier's accuracy (0.05-0.95; "
        "every class keeps at least one image on each side).",
    )


def classifier_outputs() -> list:
    return [
        ClassifierType.Output(
            "classifier",
            display_name="classifier",
            tooltip="The classifier: wire it to Measure Bias or Calibrate Intervention.",
        ),  # fmt: skip
        io.String.Output(
            "report",
            display_name="report",
            tooltip="Held-out accuracy per class (chance = 1 / classes); wire it to Preview Any.",
        ),
    ]


class TrainClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasTrainClassifier",
            display_name="Train Bias Classifier (DiffBias)",
            category="diffbias/measure",
            description=(
                "Generates images from each class prompt (image j of every class from the same seed; the label "
                "is the prompt's class), embeds them with a CLIP vision model and fits a linear classifier "
                "(multinomial logistic regression) on the embeddings. Reports its held-out accuracy per class. "
                "It reads the images, never the hook an intervention edits, so it measures the result."
            ),
            inputs=[
                io.ClipVision.Input(
                    "clip_vision",
                    tooltip="Vision model whose embeddings are classified "
                    "(Load CLIP Vision, e.g. a CLIP ViT-L/14 image encoder).",
                ),  # fmt: skip
                io.Model.Input(
                    "model", tooltip="The diffusion model that generates the class images (unpatched)."
                ),
                io.Clip.Input("clip", tooltip="Its text encoder."),
                io.Vae.Input("vae", tooltip="Its VAE, to decode the images."),
                io.String.Input(
                    "class_prompts",
                    multiline=True,
                    default="a photo of a male person\na photo of a female person",
                    tooltip="One prompt per class, one per line (at least 2). Class names are the words that "
                    "differ, or write 'name: prompt'. Use the class names of your feature set.",
                ),
                negative_prompt_input(),
                *size_inputs(),
                io.Int.Input(
                    "samples",
                    default=32,
                    min=2,
                    max=10000,
                    tooltip="Images per class (>= 2); more gives a more reliable classifier.",
                ),  # fmt: skip
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Images per sampler run."),
                *sampler_inputs(
                    cfg_tooltip="Classifier-free guidance scale.",
                    seed_tooltip="Noise seed: run j of every class uses seed + j (the same noise for every class).",
                ),
                holdout_input(),
            ],
            outputs=[
                *classifier_outputs(),
                io.Image.Output(
                    "images", display_name="images", tooltip="The generated training images, class by class."
                ),  # fmt: skip
            ],
        )

    @classmethod
    def execute(cls, clip_vision, model, clip, vae, class_prompts: str, negative_prompt: str, width: int,
                height: int, samples: int, batch_size: int, steps: int, cfg: float, sampler_name: str,
                scheduler: str, seed: int, holdout: float) -> io.NodeOutput:  # fmt: skip
        names, prompts = parse_class_prompts(class_prompts)
        runs = plan_runs(len(prompts), [samples] * len(prompts), batch_size, seed, paired=True)
        progress = comfy.utils.ProgressBar(len(runs) * steps + 1)
        negative = encode(clip, negative_prompt)
        settings = RunSettings(steps, cfg, sampler_name, scheduler)
        images, labels = [], []
        for run in runs:
            latent = sample(model, encode(clip, prompts[run.prompt]), negative,
                            empty_latent(model, run.batch, width, height), run.seed, settings, progress)  # fmt: skip
            images.append(decode(vae, latent).float().cpu())
            labels += [run.prompt] * images[-1].shape[0]
        batch = torch.cat(images)
        facts = {"source": "generated", "prompts": " | ".join(prompts), "negative_prompt": negative_prompt,
                 "samples": samples, "sampling": f"{steps} steps, cfg {cfg}, {sampler_name}/{scheduler}",
                 "seed": seed, "size": f"{width}x{height}"}  # fmt: skip
        classifier, report = fit_classifier(
            clip_vision, batch, torch.tensor(labels), names, holdout, seed, facts
        )
        progress.update(1)
        return io.NodeOutput(classifier, report, batch)


def parse_labels(text: str, count: int) -> tuple[tuple[str, ...], torch.Tensor]:
    """(class names in order of first appearance, (count,) int64 labels) from one name per image."""
    names = [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]
    if len(names) != count:
        raise ValueError(
            f"labels: expected one class name per image ({count} images), got {len(names)} names; write them "
            "in image order, separated by commas or new lines, e.g. 'male, male, female, female'"
        )
    classes = tuple(dict.fromkeys(names))
    if len(classes) < 2:
        raise ValueError(f"labels: need at least 2 different classes, got {list(classes)}")
    return classes, torch.tensor([classes.index(name) for name in names])


class TrainClassifierFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasTrainClassifierFromImages",
            display_name="Train Bias Classifier from Labelled Images (DiffBias)",
            category="diffbias/measure",
            description=(
                "Fits the same linear classifier as Train Bias Classifier on images you bring (e.g. Load Image "
                "batches of real photos), each with its class name. Reports its held-out accuracy per class."
            ),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="Vision model whose embeddings are classified."),
                io.Image.Input(
                    "images",
                    tooltip="The labelled images, as one batch (any size: each is centre-"
                    "cropped to the vision model's input).",
                ),  # fmt: skip
                io.String.Input(
                    "labels",
                    multiline=True,
                    default="",
                    tooltip="One class name per image, in batch order, separated by commas or new lines "
                    "(at least 2 classes, 2 images each). Class order = order of first appearance.",
                ),
                holdout_input(),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Seed of the split into fitting and held-out images.",
                ),  # fmt: skip
            ],
            outputs=classifier_outputs(),
        )

    @classmethod
    def execute(cls, clip_vision, images, labels: str, holdout: float, seed: int) -> io.NodeOutput:
        names, label_ids = parse_labels(labels, images.shape[0])
        facts = {"source": "labelled images", "images": int(images.shape[0])}
        classifier, report = fit_classifier(clip_vision, images, label_ids, names, holdout, seed, facts)
        return io.NodeOutput(classifier, report)


class SaveClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasSaveClassifier",
            display_name="Save Bias Classifier (DiffBias)",
            category="diffbias/measure",
            description="Writes a trained bias classifier to models/diffbias_classifiers/<file_name>.safetensors.",
            is_output_node=True,
            inputs=[
                ClassifierType.Input("classifier", tooltip="A classifier from Train Bias Classifier."),
                io.String.Input(
                    "file_name",
                    default="gender_classifier",
                    tooltip="File name without folders (letters, digits, space, ._+-).",
                ),  # fmt: skip
            ],
            outputs=[io.String.Output("path", display_name="path", tooltip="The file written.")],
        )

    @classmethod
    def execute(cls, classifier, file_name: str) -> io.NodeOutput:
        probe = getattr(classifier, "probe", None)
        if not isinstance(classifier, EmbeddingClassifier) or probe is None:
            raise ValueError(
                f"only classifiers trained by Train Bias Classifier can be saved; {getattr(classifier, 'name', '?')!r} "
                "is built in (load it from its own node)"
            )
        path = files.new_classifier_path(file_name)
        save_probe(probe, path)
        return io.NodeOutput(path)


class LoadClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasLoadClassifier",
            display_name="Load Bias Classifier (DiffBias)",
            category="diffbias/measure",
            description=(
                "Loads a bias classifier from models/diffbias_classifiers and checks that the vision model given "
                "is the one it was trained with (their embeddings of a fixed reference picture must agree)."
            ),
            inputs=[
                io.Combo.Input(
                    "classifier_name",
                    options=files.classifier_choices(),
                    tooltip="A classifier file in models/diffbias_classifiers.",
                ),  # fmt: skip
                io.ClipVision.Input(
                    "clip_vision", tooltip="The vision model the classifier was trained with."
                ),
            ],
            outputs=[
                *classifier_outputs(),
                io.String.Output(
                    "classes",
                    display_name="classes",
                    tooltip="Class names in order (the order of a target like '1,1').",
                ),  # fmt: skip
            ],
        )

    @classmethod
    def execute(cls, classifier_name: str, clip_vision) -> io.NodeOutput:
        path = files.resolve_classifier(classifier_name)
        probe = load_probe(path)
        embed = vision_embedder(clip_vision)
        check_same_model(probe, _reference(embed, clip_vision), path)
        accuracy = probe.provenance.get("heldout_accuracy", {})
        report = (
            f"{classifier_name}: {', '.join(probe.classes)}; vision model {probe.vision_model}; held-out "
            + (
                "accuracy " + ", ".join(f"{k} {v}" for k, v in accuracy.items())
                if accuracy
                else "accuracy not recorded"
            )
        )
        return io.NodeOutput(
            EmbeddingClassifier(probe, embed, chunk=EMBED_CHUNK), report, ", ".join(probe.classes)
        )


__all__ = [
    "LoadClassifier",
    "SaveClassifier",
    "TrainClassifier",
    "TrainClassifierFromImages",
    "fit_classifier",
]
