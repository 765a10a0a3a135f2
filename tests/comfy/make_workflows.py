"""Write example_workflows/*.json (UI format) from compact graphs and a running server's /object_info.

    python tests/comfy/make_workflows.py http://127.0.0.1:8188

The graphs are the source of truth for the example workflows; test_workflows.py runs the written files.
The toy world's two (toy_workflows.py) run as shipped, with no files to download, and come first.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from toy_workflows import TOY_WORKFLOWS
from workflows import build_ui, stack_columns

OUT = Path(__file__).resolve().parents[2] / "example_workflows"
CKPT = "v1-5-pruned-emaonly.safetensors"
SAE = "sd15_hspace.safetensors"
"""The SAE dissect_from_scratch trains and the other SD1.5 examples load."""
GENDER = "sd15_hspace.gender.features.safetensors"
"""The gender features dissect_from_scratch saves and the other SD1.5 examples load."""
RACE = "sd15_hspace.race.features.safetensors"
PROMPT = "a photo of the face of a firefighter"
NEGATIVE = "blurry, lowres"


def sampling_tail(
    first_id: int,
    model: tuple[int, str],
    clip: tuple[int, str],
    vae: tuple[int, str],
    x: int,
    batch: int = 4,
    prefix: str = "diffbias",
) -> list[dict]:
    """Prompt encoders, empty latent, KSampler, VAE decode and save, from ``first_id`` on."""
    pos, neg, latent, sampler, decode, save = range(first_id, first_id + 6)
    return [
        {
            "id": pos,
            "type": "CLIPTextEncode",
            "pos": (x, 40),
            "title": "Positive prompt",
            "widgets": {"text": PROMPT},
            "links": {"clip": clip},
        },
        {
            "id": neg,
            "type": "CLIPTextEncode",
            "pos": (x, 260),
            "title": "Negative prompt",
            "widgets": {"text": NEGATIVE},
            "links": {"clip": clip},
        },
        {
            "id": latent,
            "type": "EmptyLatentImage",
            "pos": (x, 480),
            "widgets": {"width": 512, "height": 512, "batch_size": batch},
        },
        {
            "id": sampler,
            "type": "KSampler",
            "pos": (x + 380, 40),
            "widgets": {"seed": 42, "steps": 30, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"},
            "links": {
                "model": model,
                "positive": (pos, "CONDITIONING"),
                "negative": (neg, "CONDITIONING"),
                "latent_image": (latent, "LATENT"),
            },
        },
        {
            "id": decode,
            "type": "VAEDecode",
            "pos": (x + 760, 40),
            "links": {"samples": (sampler, "LATENT"), "vae": vae},
        },
        {
            "id": save,
            "type": "SaveImage",
            "pos": (x + 760, 160),
            "widgets": {"filename_prefix": prefix},
            "links": {"images": (decode, "IMAGE")},
        },
    ]


def debiased_txt2img() -> list[dict]:
    return [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": (40, 40), "widgets": {"ckpt_name": CKPT}},
        {"id": 2, "type": "DiffBiasLoadSAE", "pos": (40, 220), "widgets": {"sae_name": SAE}},
        {
            "id": 3,
            "type": "DiffBiasLoadFeatures",
            "pos": (40, 420),
            "widgets": {"features_name": GENDER},
        },
        {
            "id": 4,
            "type": "DiffBiasApplyIntervention",
            "pos": (420, 40),
            "size": (340, 420),
            "widgets": {"mode": "balance", "target": "1,1", "edit": "add", "strength": 10.0, "top_k": 10},
            "links": {"model": (1, "MODEL"), "sae": (2, "sae"), "features": (3, "features")},
        },
        *sampling_tail(5, (4, "MODEL"), (1, "CLIP"), (1, "VAE"), 800, prefix="diffbias_balanced"),
    ]


def dissect_from_scratch() -> list[dict]:
    return [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": (40, 40), "widgets": {"ckpt_name": CKPT}},
        {
            "id": 2,
            "type": "DiffBiasTrainSAE",
            "pos": (420, 40),
            "size": (360, 560),
            "widgets": {
                "prompts": "a photo of a person\na photo of a doctor\na photo of a firefighter\n"
                "a photo of a nurse\na photo of a teacher",
                "negative_prompt": NEGATIVE,
                "images": 256,
                "batch_size": 4,
                "steps": 30,
                "hook": "unet.middle",
                "latents": 5120,
                "k": 32,
                "file_name": SAE.removesuffix(".safetensors"),
            },
            "links": {"model": (1, "MODEL"), "clip": (1, "CLIP")},
        },
        {
            "id": 3,
            "type": "DiffBiasAttributeFeatures",
            "pos": (820, 40),
            "size": (360, 520),
            "widgets": {
                "class_prompts": "male: a photo of a male person\nfemale: a photo of a female person",
                "negative_prompt": NEGATIVE,
                "samples": 32,
                "batch_size": 4,
                "steps": 30,
                "method": "integrated gradients",
                "top_k": 30,
            },
            "links": {"model": (1, "MODEL"), "clip": (1, "CLIP"), "sae": (2, "sae")},
        },
        {
            "id": 4,
            "type": "DiffBiasSaveFeatures",
            "pos": (1220, 520),
            "widgets": {"file_name": GENDER.removesuffix(".features.safetensors")},
            "links": {"features": (3, "features"), "sae": (2, "sae")},
        },
        {"id": 5, "type": "PreviewImage", "pos": (1220, 680), "links": {"images": (3, "chart")}},
        {
            "id": 20,
            "type": "PreviewAny",
            "pos": (820, 640),
            "title": "Report: Train Bias SAE",
            "size": (360, 260),
            "links": {"source": (2, "report")},
        },
        {
            "id": 21,
            "type": "PreviewAny",
            "pos": (820, 940),
            "title": "Report: Attribute Bias Features",
            "size": (360, 260),
            "links": {"source": (3, "report")},
        },
        {
            "id": 6,
            "type": "DiffBiasApplyIntervention",
            "pos": (1220, 40),
            "size": (340, 420),
            "widgets": {
                "mode": "balance",
                "target": "male:0.5,female:0.5",
                "edit": "add",
                "strength": 10.0,
                "top_k": 10,
            },
            "links": {"model": (1, "MODEL"), "sae": (2, "sae"), "features": (3, "features")},
        },
        *sampling_tail(7, (6, "MODEL"), (1, "CLIP"), (1, "VAE"), 1600, prefix="diffbias_dissected"),
    ]


def two_attributes() -> list[dict]:
    return [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": (40, 40), "widgets": {"ckpt_name": CKPT}},
        {"id": 2, "type": "DiffBiasLoadSAE", "pos": (40, 220), "widgets": {"sae_name": SAE}},
        {
            "id": 3,
            "type": "DiffBiasLoadFeatures",
            "pos": (40, 420),
            "title": "Gender features",
            "widgets": {"features_name": GENDER},
        },
        {
            "id": 4,
            "type": "DiffBiasLoadFeatures",
            "pos": (40, 560),
            "title": "Race features",
            "widgets": {"features_name": RACE},
        },
        {
            "id": 5,
            "type": "DiffBiasApplyIntervention",
            "pos": (420, 40),
            "size": (340, 420),
            "title": "Gender",
            "widgets": {"mode": "balance", "target": "1,1", "strength": 10.0, "top_k": 10, "seed": 1},
            "links": {"model": (1, "MODEL"), "sae": (2, "sae"), "features": (3, "features")},
        },
        {
            "id": 6,
            "type": "DiffBiasApplyIntervention",
            "pos": (420, 500),
            "size": (340, 420),
            "title": "Race",
            "widgets": {"mode": "balance", "target": "1,1,1,1", "strength": 10.0, "top_k": 10, "seed": 2},
            "links": {"model": (5, "MODEL"), "sae": (2, "sae"), "features": (4, "features")},
        },
        *sampling_tail(
            7, (6, "MODEL"), (1, "CLIP"), (1, "VAE"), 800, batch=8, prefix="diffbias_two_attributes"
        ),
    ]


WORKFLOWS = {
    **TOY_WORKFLOWS,
    "debiased_txt2img": debiased_txt2img,
    "dissect_from_scratch": dissect_from_scratch,
    "two_attributes_stacked": two_attributes,
}


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8188"
    with urllib.request.urlopen(url + "/object_info", timeout=60) as response:
        object_info = json.loads(response.read())
    OUT.mkdir(exist_ok=True)
    for name, graph in WORKFLOWS.items():
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(stack_columns(build_ui(graph(), object_info)), indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
