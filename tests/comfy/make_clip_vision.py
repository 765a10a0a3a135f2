"""Write a random-weight CLIP ViT-L/14 image encoder with ComfyUI's own classes.

Run inside a ComfyUI environment (``PYTHONPATH`` = ComfyUI + the test stubs):

    python tests/comfy/make_clip_vision.py OUT.safetensors [--seed 0]

The model is ``comfy.clip_vision.ClipVisionModel`` built from ComfyUI's ``clip_vision_config_vitl.json``
with seeded random weights (``make_checkpoint.randomize_``), saved in fp16; Load CLIP Vision detects it
as ViT-L (it needs every one of the 24 layers, so it cannot be smaller).
"""

from __future__ import annotations

import argparse
import os

import torch


def build(path: str, seed: int) -> None:
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.clip_vision
    from make_checkpoint import randomize_
    from safetensors.torch import save_file

    config = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_vitl.json")
    model = comfy.clip_vision.ClipVisionModel(config)
    randomize_(model.model, torch.Generator().manual_seed(seed))
    state = {name: tensor.detach().half().contiguous() for name, tensor in model.get_sd().items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(state, tmp, metadata={"diffbias_test": "random CLIP ViT-L/14 vision"})
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.path, args.seed)


if __name__ == "__main__":
    main()
