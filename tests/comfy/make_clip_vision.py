"""Write a random-weight CLIP ViT-L/14 image encoder with ComfyUI's own classes.

Run inside a ComfyUI environment (``PYTHONPATH`` = ComfyUI + the test stubs):

    python tests/comfy/make_clip_vision.py OUT.safetensors [--seed 0]

The model is ``comfy.clip_vision.ClipVisionModel`` built from ComfyUI's ``clip_vision_config_vitl.json``
with seeded random weights (``make_checkpoint.randomize_``), saved in fp16; Load CLIP Vision detects it
as ViT-L (it needs every one of the 24 layers, so it cannot be smaller).
"""

from __future__ import annotations

import os

import torch
from make_checkpoint import randomize_, run_script, use_cpu, write_atomically


def build(path: str, seed: int) -> None:
    use_cpu()
    import comfy.clip_vision
    from safetensors.torch import save_file

    config = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_vitl.json")
    model = comfy.clip_vision.ClipVisionModel(config)
    randomize_(model.model, torch.Generator().manual_seed(seed))
    state = {name: tensor.detach().half().contiguous() for name, tensor in model.get_sd().items()}
    metadata = {"diffbias_test": "random CLIP ViT-L/14 vision"}
    write_atomically(path, lambda temp: save_file(state, temp, metadata=metadata))


if __name__ == "__main__":
    run_script(build, __doc__)
