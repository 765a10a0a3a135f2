"""Stages that check themselves, through the real server: what a user reads in Preview Any, and the error
when the class prompts do not separate the classes."""

from __future__ import annotations

from .comfy_server import execution_error
from .conftest import CHECKPOINT

SAMPLING = {"negative_prompt": "", "width": 64, "height": 64, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "seed": 0}  # fmt: skip


def _text(entry: dict, node: str) -> str:
    """What Preview Any node ``node`` shows."""
    assert execution_error(entry) is None, execution_error(entry)
    return "\n".join(entry["outputs"][node]["text"])


def test_identical_class_prompts_stop_attribution_with_a_clear_error(server):
    """Two identical prompts from the same noise: the probes are at chance at every step."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "DiffBiasLoadSAE", "inputs": {"sae_name": "sd15_hspace.safetensors"}},
        "3": {
            "class_type": "DiffBiasAttributeFeatures",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "sae": ["2", 0],
                "class_prompts": "first: a photo of a person\nsecond: a photo of a person",
                **SAMPLING,
                "samples": 16,
                "batch_size": 16,
                "method": "integrated gradients",
                "top_k": 5,
            },  # fmt: skip
        },
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 3]}},
    }
    error = execution_error(server.run(prompt))
    assert error is not None, "identical prompts produced a feature set"
    message = error["exception_message"]
    assert "do not separate the classes ['first', 'second'] at hook 'unet.middle'" in message, message
    assert "chance 0.50" in message and "no features were ranked" in message, message


def test_train_report_is_a_string_output_with_fvu_dead_latents_and_verdict(server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {
            "class_type": "DiffBiasTrainSAE",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "prompts": "a photo of a person\na photo of a cat",
                **SAMPLING,
                "images": 4,
                "batch_size": 2,
                "hook": "unet.middle",
                "latents": 16,
                "k": 4,
                "file_name": "checked_sae",
            },  # fmt: skip
        },
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    report = _text(server.run(prompt), "3")
    # 4 images x 2 steps x one bottleneck position at 64 px: 8 rows, one image (2 rows) held out
    assert "checked_sae.safetensors" in report and "8 activation rows recorded (2 held out)" in report, report
    assert "on 2 held-out rows" in report and "dead latents" in report, report
    assert "verdict: under-trained" in report and "6 training rows for 16 latents" in report, report


def test_preview_features_report_output(server):
    prompt = {
        "1": {
            "class_type": "DiffBiasLoadFeatures",
            "inputs": {"features_name": "sd15_hspace.gender.features.safetensors"},
        },  # fmt: skip
        "2": {"class_type": "DiffBiasPreviewFeatures", "inputs": {"features": ["1", 0], "top_k": 10}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    report = _text(server.run(prompt), "3")
    assert "features at unet.middle (male, female)" in report, report
    assert report.endswith("no warnings"), report  # distinct ids per class, positive scores
