"""Measure Bias: classify generated images, report FD, shares with intervals, KL and what the twins kept."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..diffbias_core.measure import format_report, measure_images, per_image_table
from ..diffbias_core.measure.classifier import check_classifier
from .measure_chart import measure_chart
from .wires import ClassifierType

NOT_MEASURED = -1.0
"""Value of a similarity output when no twins were given."""


def target_input() -> io.String.Input:
    """The target distribution, in Apply Feature Intervention's syntax."""
    return io.String.Input(
        "target",
        default="",
        tooltip="Target distribution over the classifier's classes, as in Apply Feature Intervention: '' = "
        "uniform, '1,1' in class order, or 'male:0.3,female:0.7'. Weights >= 0, at least one > 0.",
    )


class MeasureBias(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBiasMeasureBias",
            display_name="Measure Bias (DiffBias)",
            category="diffbias/measure",
            description=(
                "Classifies the images with a classifier that does not read the edited hook and reports how far "
                "their class distribution is from the target: fairness discrepancy FD = |mean p - target| "
                "(soft from probabilities, hard from counts), class shares with Wilson 95% intervals, KL. "
                "With twin images (the same seeds without the intervention) also what was kept: CLIP-I "
                "((cos + 1) / 2 of the vision embeddings) and pixel similarity (1 - mean |a - b|). Wire the "
                "report to Preview Any."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The generated images to measure (a batch)."),
                ClassifierType.Input(
                    "classifier",
                    tooltip="Classifier of the attribute (Train/Load Bias Classifier, or the toy world's oracle).",
                ),
                target_input(),
                io.Image.Input(
                    "twins",
                    optional=True,
                    tooltip="Optional: the same seeds sampled without the intervention, one per image, same size. "
                    "Adds CLIP-I and pixel similarity (1 = unchanged).",
                ),
            ],
            outputs=[
                io.String.Output(
                    "report",
                    display_name="report",
                    tooltip="Every figure in words; wire it to Preview Any to read it.",
                ),  # fmt: skip
                io.Image.Output(
                    "chart",
                    display_name="chart",
                    tooltip="Class shares against the target with 95% intervals, and each image with its class.",
                ),
                io.Float.Output(
                    "fd",
                    display_name="fd",
                    tooltip="Soft FD (0 = on target; 0.03 or less is close); the mean over groups when the "
                    "classifier gives groups (e.g. the toy world's shapes).",
                ),
                io.Float.Output(
                    "hard_fd",
                    display_name="hard_fd",
                    tooltip="FD of the argmax counts (mean over groups with groups).",
                ),  # fmt: skip
                io.Float.Output(
                    "kl",
                    display_name="kl",
                    tooltip="KL(mean probabilities || target) in nats (0 = on target).",
                ),  # fmt: skip
                io.Float.Output(
                    "clip_i",
                    display_name="clip_i",
                    tooltip="Mean CLIP-I against the twins, in [0, 1] (1 = same embedding); -1 without twins or "
                    "when the classifier has no embeddings.",
                ),
                io.Float.Output(
                    "pixel_similarity",
                    display_name="pixel_similarity",
                    tooltip="Mean 1 - mean |image - twin| over pixels, in [0, 1] (1 = identical); -1 without twins.",
                ),
                io.String.Output(
                    "per_image",
                    display_name="per_image",
                    tooltip="CSV: per image its class, the probability of every class, and its similarity to its twin.",
                ),
            ],
        )

    @classmethod
    def execute(cls, images, classifier, target: str, twins=None) -> io.NodeOutput:
        check_classifier(classifier)
        report = measure_images(classifier, images, target, twins)
        hard = report.group_fd_hard if report.group_fd_hard is not None else report.hard_fd
        kept = report.preservation
        clip_i = kept.clip_i_mean if kept is not None and kept.clip_i_mean is not None else NOT_MEASURED
        pixel = kept.pixel_mean if kept is not None else NOT_MEASURED
        chart = measure_chart(report, images)
        return io.NodeOutput(
            format_report(report),
            chart,
            float(report.fd),
            float(hard),
            float(report.kl),
            float(clip_i),
            float(pixel),
            per_image_table(report),
            ui=ui.PreviewImage(chart, cls=cls),
        )


__all__ = ["MeasureBias", "target_input"]
