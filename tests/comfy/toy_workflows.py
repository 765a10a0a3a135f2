"""The toy world's example workflows as compact graphs (see make_workflows.py; they run as shipped).

``01_toy_world_debias``: the shipped toy model, SAE and colour features; the same seeds sampled plain and
with Apply Feature Intervention (balance to uniform), both batches measured by the exact oracle.
``02_toy_world_dissect``: Train Bias SAE -> Attribute Bias Features -> Save -> Apply -> measure, in the graph.
"""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle")
PER_SHAPE = 96
"""Images per shape in each batch (the plain one and the intervened one)."""
SEEDS = (1, 2, 3)
"""KSampler seed of each shape (the same for the plain and the intervened batch: twins)."""
SAMPLER = {"steps": 10, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
"""The toy's own DDIM: 10 steps of the simple scheduler (t = 1, 0.9, ..., 0.1), no guidance."""
INTERVENTION = {
    "mode": "balance",
    "target": "",
    "edit": "add",
    "strength": 2.5,
    "top_k": 30,
    "start_percent": 0.05,
    "end_percent": 0.85,
    "cond_only": True,
    "seed": 0,
}
"""The demo's edit: +2.5 on the top 30 features of each image's colour, on steps 2-9 of 10 (10%-90%)."""
SHIPPED_SAE = "toy_world/toy_sae.safetensors"
SHIPPED_FEATURES = "toy_world/toy_world.colour.features.safetensors"
TRAINED = "toy_world_trained"
"""File name of the SAE the dissect workflow trains (and of its feature set, with '.colour')."""
DISSECT_PROMPTS = "\n".join(
    [f"a {shape}" for shape in SHAPES]
    + [f"a {colour} {shape}" for shape in SHAPES for colour in ("red", "green", "blue")]
)
# Node ids the measured test reads (both workflows use the same sampling tail).
MEASURE_PLAIN, MEASURE_AFTER = 40, 41
DECODE_PLAIN, DECODE_AFTER = 36, 37


def _sampling_tail(model_after: tuple[int, str], x: int) -> list[dict]:
    """Prompts, the plain and the intervened KSampler per shape, their batches, decode, previews, measures."""
    clip, plain_model = (1, "CLIP"), (1, "MODEL")
    graph: list[dict] = [
        {"id": 10, "type": "CLIPTextEncode", "pos": (x, 40), "title": "Negative (unused at cfg 1)",
         "widgets": {"text": ""}, "links": {"clip": clip}},
        {"id": 11, "type": "EmptyLatentImage", "pos": (x, 200),
         "widgets": {"width": 128, "height": 128, "batch_size": PER_SHAPE}},
    ]  # fmt: skip
    for k, (shape, seed) in enumerate(zip(SHAPES, SEEDS, strict=True)):
        encode, plain, after = 12 + k, 20 + k, 24 + k
        graph.append({"id": encode, "type": "CLIPTextEncode", "pos": (x, 400 + 200 * k), "title": f"Prompt: {shape}",
                      "widgets": {"text": f"a {shape}"}, "links": {"clip": clip}})  # fmt: skip
        for node_id, model, column, title in ((plain, plain_model, x + 380, "plain"),
                                              (after, model_after, x + 760, "intervention")):  # fmt: skip
            graph.append({
                "id": node_id, "type": "KSampler", "pos": (column, 40 + 300 * k), "title": f"{shape}: {title}",
                "widgets": {"seed": seed, **SAMPLER},
                "links": {"model": model, "positive": (encode, "CONDITIONING"), "negative": (10, "CONDITIONING"),
                          "latent_image": (11, "LATENT")},
            })  # fmt: skip
    for first, batch_ids, decode, column, title in ((20, (30, 31), DECODE_PLAIN, x + 1140, "Plain (biased)"),
                                                   (24, (32, 33), DECODE_AFTER, x + 1520, "With the intervention")):  # fmt: skip
        graph += [
            {"id": batch_ids[0], "type": "LatentBatch", "pos": (column, 40),
             "links": {"samples1": (first, "LATENT"), "samples2": (first + 1, "LATENT")}},
            {"id": batch_ids[1], "type": "LatentBatch", "pos": (column, 200),
             "links": {"samples1": (batch_ids[0], "LATENT"), "samples2": (first + 2, "LATENT")}},
            {"id": decode, "type": "VAEDecode", "pos": (column, 360),
             "links": {"samples": (batch_ids[1], "LATENT"), "vae": (1, "VAE")}},
            {"id": decode + 2, "type": "PreviewImage", "pos": (column, 500), "title": title, "size": (340, 420),
             "links": {"images": (decode, "IMAGE")}},
        ]  # fmt: skip
    graph += [
        {"id": 5, "type": "DiffBiasToyWorldOracle", "pos": (x + 1900, 40), "widgets": {"attribute": "colour"}},
        {"id": MEASURE_PLAIN, "type": "DiffBiasMeasureBias", "pos": (x + 1900, 200), "title": "Measure: plain",
         "widgets": {"target": ""}, "links": {"images": (DECODE_PLAIN, "IMAGE"), "classifier": (5, "classifier")}},
        {"id": MEASURE_AFTER, "type": "DiffBiasMeasureBias", "pos": (x + 1900, 560),
         "title": "Measure: with the intervention", "widgets": {"target": ""},
         "links": {"images": (DECODE_AFTER, "IMAGE"), "classifier": (5, "classifier"),
                   "twins": (DECODE_PLAIN, "IMAGE")}},
        {"id": 42, "type": "PreviewAny", "pos": (x + 2280, 40), "title": "Report: plain", "size": (420, 420),
         "links": {"source": (MEASURE_PLAIN, "report")}},
        {"id": 43, "type": "PreviewAny", "pos": (x + 2280, 520), "title": "Report: with the intervention",
         "size": (420, 420), "links": {"source": (MEASURE_AFTER, "report")}},
    ]  # fmt: skip
    return graph


def toy_world_debias() -> list[dict]:
    return [
        {"id": 1, "type": "DiffBiasLoadToyWorld", "pos": (40, 40)},
        {"id": 2, "type": "DiffBiasLoadSAE", "pos": (40, 240), "widgets": {"sae_name": SHIPPED_SAE}},
        {"id": 3, "type": "DiffBiasLoadFeatures", "pos": (40, 560), "widgets": {"features_name": SHIPPED_FEATURES}},
        {"id": 4, "type": "DiffBiasApplyIntervention", "pos": (40, 760), "size": (340, 420),
         "widgets": INTERVENTION, "links": {"model": (1, "MODEL"), "sae": (2, "sae"), "features": (3, "features")}},
        *_sampling_tail((4, "MODEL"), 420),
    ]  # fmt: skip


DISSECT_TRAIN = {
    "prompts": DISSECT_PROMPTS,
    "negative_prompt": "",
    "width": 128,
    "height": 128,
    **{key: SAMPLER[key] for key in ("steps", "cfg", "sampler_name", "scheduler")},
    "seed": 100,
    "images": 480,
    "batch_size": 40,
    "hook": "unet.middle",
    "latents": 512,
    "k": 8,
    "file_name": TRAINED,
}
"""Train Bias SAE: 40 images of each of the 12 prompts (every shape, plain and with each colour named)."""
DISSECT_ATTRIBUTE = {
    "class_prompts": "red: a red circle\ngreen: a green circle\nblue: a blue circle",
    "negative_prompt": "",
    "width": 128,
    "height": 128,
    "samples": 48,
    "batch_size": 48,
    **{key: SAMPLER[key] for key in ("steps", "cfg", "sampler_name", "scheduler")},
    "seed": 200,
    "method": "integrated gradients",
    "top_k": 30,
}
"""Attribute Bias Features: 48 noises, each sampled as a red, a green and a blue circle."""
DISSECT_INTERVENTION = {**INTERVENTION, "strength": 4.0}
"""An SAE trained in the graph (64 optimizer steps, FVU ~0.45) codes colour less cleanly than the shipped one
(FVU ~0.2): its features need a stronger push (measured on the node path's emulation in the core: FD 0.14
at 2.5, 0.09 at 3.0, 0.04 at 4.0, shape accuracy 0.99 / 0.99 / 0.97)."""


def toy_world_dissect() -> list[dict]:
    return [
        {"id": 1, "type": "DiffBiasLoadToyWorld", "pos": (40, 40)},
        {"id": 2, "type": "DiffBiasTrainSAE", "pos": (40, 240), "size": (360, 640), "widgets": DISSECT_TRAIN,
         "links": {"model": (1, "MODEL"), "clip": (1, "CLIP")}},
        {"id": 3, "type": "DiffBiasAttributeFeatures", "pos": (40, 920), "size": (360, 600),
         "widgets": DISSECT_ATTRIBUTE, "links": {"model": (1, "MODEL"), "clip": (1, "CLIP"), "sae": (2, "sae")}},
        {"id": 6, "type": "DiffBiasSaveFeatures", "pos": (40, 1560), "widgets": {"file_name": TRAINED + ".colour"},
         "links": {"features": (3, "features"), "sae": (2, "sae")}},
        {"id": 7, "type": "PreviewImage", "pos": (40, 1720), "title": "Features and probe accuracy",
         "links": {"images": (3, "chart")}},
        {"id": 4, "type": "DiffBiasApplyIntervention", "pos": (40, 2040), "size": (340, 420),
         "widgets": DISSECT_INTERVENTION, "links": {"model": (1, "MODEL"), "sae": (2, "sae"), "features": (3, "features")}},
        *_sampling_tail((4, "MODEL"), 420),
        {"id": 50, "type": "PreviewAny", "pos": (420, 1200), "title": "Report: Train Bias SAE", "size": (340, 300),
         "links": {"source": (2, "report")}},
        {"id": 51, "type": "PreviewAny", "pos": (420, 1540), "title": "Report: Attribute Bias Features",
         "size": (340, 300), "links": {"source": (3, "report")}},
    ]  # fmt: skip


TOY_WORKFLOWS = {"01_toy_world_debias": toy_world_debias, "02_toy_world_dissect": toy_world_dissect}
