"""Bad input through the real server: a clear message saying what is wrong and how to fix it; the server
keeps running and the next prompt works."""

from __future__ import annotations

import json

import pytest

from .comfy_server import PromptRefused, execution_error
from .conftest import CHECKPOINT

GENDER = "sd15_hspace.gender.features.safetensors"


def apply_prompt(sae: str = "sd15_hspace.safetensors", features: str = GENDER, **widgets) -> dict:
    """Checkpoint -> Apply Feature Intervention -> PreviewAny (no sampling: the checks come first)."""
    inputs = {
        "mode": "balance",
        "target": "",
        "edit": "add",
        "strength": 10.0,
        "top_k": 10,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "cond_only": True,
        "seed": 0,
    }
    inputs.update(widgets)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "DiffBiasLoadSAE", "inputs": {"sae_name": sae}},
        "3": {"class_type": "DiffBiasLoadFeatures", "inputs": {"features_name": features}},
        "4": {
            "class_type": "DiffBiasApplyIntervention",
            "inputs": {"model": ["1", 0], "sae": ["2", 0], "features": ["3", 0], **inputs},
        },
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }


def failure(server, prompt: dict) -> str:
    """The message of a refused or failed prompt (AssertionError if it succeeded)."""
    try:
        entry = server.run(prompt)
    except PromptRefused as refused:
        return json.dumps(refused.answer)
    error = execution_error(entry)
    assert error is not None, f"the prompt succeeded: {entry['outputs']}"
    return f"{error['exception_type']}: {error['exception_message']}"


def assert_server_still_works(server):
    entry = server.run(apply_prompt(seed=123))
    assert execution_error(entry) is None
    assert entry["status"]["status_str"] == "success"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (apply_prompt(sae="wrong_width.safetensors", features=GENDER), ["fingerprint"]),
        (
            apply_prompt(sae="other_sd15.safetensors"),
            ["fingerprint", "load the SAE the features were found on"],
        ),
        (apply_prompt(target="1,1,1"), ["expected 2 weights", "male", "female"]),
        (apply_prompt(target="male:-1,female:2"), ["must be finite and >= 0"]),
        (apply_prompt(mode="push", target="1,1"), ["ONE class", "female"]),
        (apply_prompt(edit="scale", strength=-2.0), ["out of range for 'scale'", "1 = unchanged"]),
        (apply_prompt(strength=5000.0), ["bigger than max"]),
        (apply_prompt(start_percent=0.8, end_percent=0.2), ["start_percent", "end_percent"]),
        (apply_prompt(sae="missing.safetensors"), ["missing.safetensors", "not in the SAE folders"]),
        (
            apply_prompt(features="missing.features.safetensors"),
            ["missing.features.safetensors", "Save Bias Features"],
        ),
    ],
    ids=[
        "features_for_other_width",
        "features_for_other_sae",
        "target_class_count",
        "negative_weight",
        "push_needs_one_class",
        "scale_out_of_range",
        "strength_above_max",
        "empty_window",
        "missing_sae",
        "missing_features",
    ],
)
def test_bad_apply_input(server, prompt, expected):
    message = failure(server, prompt)
    for text in expected:
        assert text in message, f"{text!r} not in: {message}"
    assert_server_still_works(server)


def attribute_with_sae(
    sae_name: str, class_prompts: str = "a photo of a male person\na photo of a female person"
) -> dict:
    """API graph: checkpoint + the named SAE into Attribute Bias Features (tiny sizes)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "DiffBiasLoadSAE", "inputs": {"sae_name": sae_name}},
        "3": {
            "class_type": "DiffBiasAttributeFeatures",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "sae": ["2", 0],
                "class_prompts": class_prompts,
                "negative_prompt": "",
                "width": 64,
                "height": 64,
                "samples": 2,
                "batch_size": 2,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "seed": 0,
                "method": "mean difference",
                "top_k": 5,
            },
        },
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
    }


def test_sae_for_another_width_or_hook(server):
    """An SAE with the right features but the wrong width / hook: the check before sampling names both."""
    width = failure(server, attribute_with_sae("wrong_width.safetensors"))
    assert "640" in width and "1280" in width, width
    hook = failure(server, attribute_with_sae("wrong_hook.safetensors"))
    assert "dit.double.0" in hook and "unet.middle" in hook, hook
    assert_server_still_works(server)


@pytest.mark.parametrize(
    ("class_prompts", "expected"),
    [("", "at least 2"), ("a photo of a person", "at least 2")],
    ids=["empty", "one_class"],
)
def test_too_few_class_prompts(server, class_prompts, expected):
    message = failure(server, attribute_with_sae("sd15_hspace.safetensors", class_prompts))
    assert expected in message and "one prompt per line" in message, message
    assert_server_still_works(server)
