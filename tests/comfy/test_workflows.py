"""Every example workflow, converted to the API format, runs to completion through a real headless server.

The conversion changes the checkpoint name (to the random-weight SD1.5 checkpoint) and shrinks sizes,
steps and image counts to tiny values (64x64, 2 steps) so that the CPU run takes seconds per node.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .comfy_server import execution_error
from .conftest import CHECKPOINT, CLIP_VISION
from .workflows import ui_to_api

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
TINY = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
    "DiffBiasTrainSAE": {
        "width": 64,
        "height": 64,
        "steps": 2,
        "images": 4,
        "batch_size": 2,
        "latents": 256,
        "k": 8,
        "file_name": "tiny_trained",  # not the name the other examples load: the test's SAE files stay as made
    },
    "DiffBiasSaveFeatures": {"file_name": "tiny_trained.gender"},
    "DiffBiasAttributeFeatures": {"width": 64, "height": 64, "steps": 2, "samples": 3, "batch_size": 3},
    "CLIPVisionLoader": {"clip_name": CLIP_VISION},
    "DiffBiasTrainClassifier": {
        "width": 64,
        "height": 64,
        "steps": 2,
        "samples": 2,
        "batch_size": 2,
        "holdout": 0.5,
    },
    "DiffBiasCalibrateIntervention": {"width": 64, "height": 64, "steps": 2, "batch_size": 2, "max_runs": 2},
}


def tiny(prompt: dict) -> dict:
    for node in prompt.values():
        node["inputs"].update(TINY.get(node["class_type"], {}))
    return prompt


def test_examples_exist():
    names = {path.stem for path in EXAMPLES}
    assert {"debiased_txt2img", "dissect_from_scratch", "two_attributes_stacked"} <= names


def test_examples_are_listed_as_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates.get("diffbias", [])) == sorted(path.stem for path in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_workflow_runs(server, path, request):
    object_info = server.get("/object_info")
    workflow = json.loads(path.read_text())
    if any(node["type"] == "CLIPVisionLoader" for node in workflow["nodes"]):
        request.getfixturevalue("clip_vision")  # the random ViT-L in models/clip_vision
    prompt = tiny(ui_to_api(workflow, object_info))
    ui_types = sorted(node["type"] for node in workflow["nodes"])
    assert sorted(node["class_type"] for node in prompt.values()) == ui_types
    entry = server.run(prompt)
    error = execution_error(entry)
    assert error is None, f"{error.get('exception_message')}\n{''.join(error.get('traceback', []))[-3000:]}"
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert images, f"no images in the outputs: {entry['outputs']}"


def test_examples_are_served_to_the_frontend(server):
    for path in EXAMPLES:
        assert server.get(f"/api/workflow_templates/diffbias/{path.name}") == json.loads(path.read_text())
