"""Train Bias Classifier -> Calibrate Intervention -> Apply Feature Intervention -> Measure Bias through a real
server, with a random-weight CLIP ViT-L/14 vision model built by ComfyUI's own classes.

Measure's figures must equal the core metrics computed here from the labels and probabilities it lists per
image; the calibrated strength (a FLOAT output) must feed Apply's strength widget input; a saved classifier
must load and measure the same images to the same figures.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffbias_core.measure.metrics import fairness_discrepancy, kl_to_target

from .comfy_server import execution_error
from .conftest import CHECKPOINT

GENDER = "sd15_hspace.gender.features.safetensors"
SAMPLER = {"steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"}


def previews(prompt: dict, sources: dict[str, list]) -> dict:
    """Add a Preview Any node per source (name -> [node, output]); returns the prompt."""
    for name, source in sources.items():
        prompt[f"show_{name}"] = {"class_type": "PreviewAny", "inputs": {"source": source}}
    return prompt


def base_nodes(clip_vision_name: str) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_vision_name}},
        "pos": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a photo of a firefighter", "clip": ["ckpt", 1]},
        },
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "twin_sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["ckpt", 0],
                "seed": 5,
                **SAMPLER,
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "denoise": 1.0,
            },
        },  # fmt: skip
        "twins": {"class_type": "VAEDecode", "inputs": {"samples": ["twin_sample", 0], "vae": ["ckpt", 2]}},
    }


def verify_prompt(clip_vision_name: str) -> dict:
    intervention = {"mode": "balance", "target": "", "edit": "add", "top_k": 10, "start_percent": 0.0,
                    "end_percent": 1.0, "cond_only": True, "seed": 0}  # fmt: skip
    prompt = {
        **base_nodes(clip_vision_name),
        "sae": {"class_type": "DiffBiasLoadSAE", "inputs": {"sae_name": "sd15_hspace.safetensors"}},
        "features": {"class_type": "DiffBiasLoadFeatures", "inputs": {"features_name": GENDER}},
        "train": {
            "class_type": "DiffBiasTrainClassifier",
            "inputs": {
                "clip_vision": ["vision", 0],
                "model": ["ckpt", 0],
                "clip": ["ckpt", 1],
                "vae": ["ckpt", 2],
                "class_prompts": "a photo of a male person\na photo of a female person",
                "negative_prompt": "",
                "width": 64,
                "height": 64,
                "samples": 2,
                "batch_size": 2,
                **SAMPLER,
                "seed": 0,
                "holdout": 0.5,
            },
        },  # fmt: skip
        "calibrate": {
            "class_type": "DiffBiasCalibrateIntervention",
            "inputs": {
                "model": ["ckpt", 0],
                "sae": ["sae", 0],
                "features": ["features", 0],
                "classifier": ["train", 0],
                "vae": ["ckpt", 2],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                **intervention,
                "width": 64,
                "height": 64,
                "batch_size": 2,
                **SAMPLER,
                "noise_seed": 1000,
                "max_strength": 20.0,
                "tolerance": 0.0,
                "max_runs": 2,
            },
        },  # fmt: skip
        "apply": {
            "class_type": "DiffBiasApplyIntervention",
            "inputs": {
                "model": ["ckpt", 0],
                "sae": ["sae", 0],
                "features": ["features", 0],
                **intervention,
                "strength": ["calibrate", 0],
            },
        },  # fmt: skip
        "sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["apply", 0],
                "seed": 5,
                **SAMPLER,
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "denoise": 1.0,
            },
        },  # fmt: skip
        "images": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "measure": {
            "class_type": "DiffBiasMeasureBias",
            "inputs": {
                "images": ["images", 0],
                "classifier": ["train", 0],
                "target": "",
                "twins": ["twins", 0],
            },
        },  # fmt: skip
        "measure_twins": {
            "class_type": "DiffBiasMeasureBias",
            "inputs": {"images": ["twins", 0], "classifier": ["train", 0], "target": "male:1,female:3"},
        },  # fmt: skip
        "save": {
            "class_type": "DiffBiasSaveClassifier",
            "inputs": {"classifier": ["train", 0], "file_name": "test_gender"},
        },
    }
    outputs = ("report", "chart", "fd", "hard_fd", "kl", "clip_i", "pixel_similarity", "per_image")
    sources = {f"m_{name}": ["measure", i] for i, name in enumerate(outputs) if name != "chart"}
    sources |= {f"t_{name}": ["measure_twins", i] for i, name in enumerate(outputs) if name != "chart"}
    sources |= {
        "fit": ["train", 1],
        "strength": ["calibrate", 0],
        "calibration": ["calibrate", 2],
        "saved": ["save", 0],
    }
    return previews(prompt, sources)


def texts(entry: dict) -> dict[str, str]:
    return {
        node[len("show_") :]: out["text"][0]
        for node, out in entry["outputs"].items()
        if node.startswith("show_")
    }


def parse_per_image(csv: str) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    head, *rows = [line.split(",") for line in csv.splitlines()]
    classes = [name.removeprefix("p_") for name in head if name.startswith("p_")]
    probs = torch.tensor(
        [[float(row[head.index(f"p_{c}")]) for c in classes] for row in rows], dtype=torch.float64
    )
    extra = {name: torch.tensor([float(row[i]) for row in rows]) for i, name in enumerate(head)
             if name in ("pixel_similarity", "clip_i")}  # fmt: skip
    labels = [row[1] for row in rows]
    assert all(label == classes[int(p.argmax())] for label, p in zip(labels, probs, strict=True))
    return classes, probs, extra


def check_figures(shown: dict[str, str], prefix: str, target: list[float]) -> None:
    """Measure's outputs against the core metrics computed from its per-image table."""
    classes, probs, extra = parse_per_image(shown[f"{prefix}_per_image"])
    assert classes == ["male", "female"]
    probs = probs / probs.sum(1, keepdim=True)  # printed with 6 decimals
    counts = torch.bincount(probs.argmax(1), minlength=2).double()
    assert float(shown[f"{prefix}_fd"]) == pytest.approx(fairness_discrepancy(probs, target), abs=2e-6)
    assert float(shown[f"{prefix}_hard_fd"]) == pytest.approx(fairness_discrepancy(counts, target), abs=1e-12)
    assert float(shown[f"{prefix}_kl"]) == pytest.approx(kl_to_target(probs, target), abs=2e-5)
    assert f"FD soft {float(shown[f'{prefix}_fd']):.4f}" in shown[f"{prefix}_report"]
    for name in ("pixel_similarity", "clip_i"):
        value = float(shown[f"{prefix}_{name}"])
        if name in extra:
            assert 0.0 <= value <= 1.0 and value == pytest.approx(float(extra[name].mean()), abs=2e-6)
        else:
            assert value == -1.0  # not measured without twins


@pytest.mark.slow
def test_train_calibrate_apply_measure_and_reload(server, server_base, clip_vision):
    entry = server.run(verify_prompt(clip_vision), timeout=2400)
    error = execution_error(entry)
    assert error is None, f"{error.get('exception_message')}\n{''.join(error.get('traceback', []))[-3000:]}"
    shown = texts(entry)
    check_figures(shown, "m", [0.5, 0.5])
    check_figures(shown, "t", [0.25, 0.75])
    assert 0.0 < float(shown["m_clip_i"]) <= 1.0 and 0.0 < float(shown["m_pixel_similarity"]) <= 1.0
    assert "held-out accuracy" in shown["fit"] and "male:" in shown["fit"]
    strength = float(shown["strength"])
    assert shown["calibration"].startswith(f"strength {strength:.6g}: FD")
    runs = [line for line in shown["calibration"].splitlines() if line.strip().startswith("run ")]
    assert len(runs) == 2 and "run 2 (bracket): strength 1.25 ->" in runs[1]  # tolerance 0: a second run
    assert not math.isnan(strength)
    images = [image for out in entry["outputs"].values() for image in out.get("images", [])]
    assert images, "Measure Bias shows its chart"
    saved = server_base / "models" / "diffbias_classifiers" / "test_gender.safetensors"
    assert shown["saved"] == str(saved) and saved.is_file()

    reload = {
        **base_nodes(clip_vision),
        "load": {
            "class_type": "DiffBiasLoadClassifier",
            "inputs": {"classifier_name": "test_gender.safetensors", "clip_vision": ["vision", 0]},
        },  # fmt: skip
        "measure_twins": {
            "class_type": "DiffBiasMeasureBias",
            "inputs": {"images": ["twins", 0], "classifier": ["load", 0], "target": "male:1,female:3"},
        },  # fmt: skip
    }
    again = server.run(previews(reload, {"t_per_image": ["measure_twins", 7], "t_fd": ["measure_twins", 2],
                                         "classes": ["load", 2]}), timeout=1200)  # fmt: skip
    assert execution_error(again) is None, execution_error(again)
    loaded = texts(again)
    assert loaded["classes"] == "male, female"
    assert loaded["t_per_image"] == shown["t_per_image"] and loaded["t_fd"] == shown["t_fd"]
