"""Write a random-weight SD1.5-architecture checkpoint with ComfyUI's own classes.

Run inside a ComfyUI environment (``PYTHONPATH`` = ComfyUI + the test stubs):

    python tests/comfy/make_checkpoint.py OUT.safetensors [--seed 0]

The UNet, CLIP-L text encoder and VAE are ComfyUI's SD1.5 modules with seeded random weights
(fan-in scaled normal matrices, unit norm scales, zero biases), saved in fp16 by
``comfy.sd.save_checkpoint``; ``CheckpointLoaderSimple`` detects the file as SD1.5.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

import torch


def use_cpu() -> None:
    """Make ComfyUI run on CPU; call before the first import of ``comfy.model_management``."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(temp)`` a file beside ``path``, then rename it into place: a killed run leaves no half file
    under the cached name (the fixtures build only when the name is missing)."""
    temp = f"{path}.tmp-{os.getpid()}"
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def run_script(build: Callable[[str, int], None], doc: str) -> None:
    """The command line of these scripts: ``OUT.safetensors [--seed N]``, then ``build(OUT, N)``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.path, args.seed)


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded random weights: matrices N(0, 1/fan_in), 1-d scales 1, biases 0."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = math.prod(param.shape[1:])
                value = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
            elif name.endswith("bias"):
                value = torch.zeros(param.shape)
            else:
                value = torch.ones(param.shape)
            param.copy_(value.to(param.dtype))


def sd15_unet_config(dtype: torch.dtype, model_channels: int = 320) -> dict:
    """ComfyUI's SD1.5 UNet config (``model_channels`` 320); a smaller width keeps the layout, cheaper."""
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": 768,
        "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "dtype": dtype,
    }


def build(path: str, seed: int) -> None:
    use_cpu()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    generator = torch.Generator().manual_seed(seed)
    unet_config = sd15_unet_config(torch.float16)
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.set_inference_dtype(torch.float16, None)
    base = model_config.get_model({})
    randomize_(base.diffusion_model, generator)
    device = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)

    clip_target = model_config.clip_target({})
    clip = comfy.sd.CLIP(clip_target, model_options={"dtype": torch.float16})
    randomize_(clip.cond_stage_model, generator)

    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    autoencoder = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    randomize_(autoencoder, generator)
    vae = comfy.sd.VAE(sd={k: v.half() for k, v in autoencoder.state_dict().items()})
    del autoencoder

    metadata = {"diffbias_test": "random SD1.5"}
    write_atomically(
        path, lambda temp: comfy.sd.save_checkpoint(temp, model, clip=clip, vae=vae, metadata=metadata)
    )


if __name__ == "__main__":
    run_script(build, __doc__)
