"""Checks of the toy world inside a real ComfyUI process; prints one JSON line ``RESULTS {...}``.

Run by tests/comfy/test_toy_world.py as ``python toy_checks.py`` (cwd = ComfyUI, the torchvision stub
on PYTHONPATH). The plugin is loaded by ComfyUI's own loader; the stock KSampler samples the toy model
and its images are compared with the toy's own DDIM sampler from the same noise.
"""

from __future__ import annotations

import asyncio
import json
import sys
from importlib import import_module
from pathlib import Path

import comfy.cli_args
import torch

comfy.cli_args.args.cpu = True

import utils.extra_config  # noqa: E402,F401  (before nodes: ComfyUI's utils package, as main.py does)

import nodes  # noqa: E402  (ComfyUI's own nodes module)

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(2)
STEPS = 10
SEED = 3
BATCH = 12


def load_plugin():
    if not asyncio.run(nodes.load_custom_node(str(REPO))):
        raise RuntimeError("ComfyUI's loader did not load the plugin")
    return sys.modules[str(REPO).replace(".", "_x_")].__name__


def node(mapping, node_id: str, **inputs):
    """Run a V3 node's execute and return its outputs (a tuple)."""
    return tuple(mapping[node_id].execute(**inputs).result)


def ksampler(model, positive, sampler: str, scheduler: str, batch: int = BATCH, seed: int = SEED):
    latent = nodes.EmptyLatentImage().generate(128, 128, batch)[0]
    return nodes.common_ksampler(model, seed, STEPS, 1.0, sampler, scheduler, positive, positive, latent)[0]


def main() -> None:
    package = load_plugin()
    core = sys.modules[package + ".diffbias_core"]
    diffusion = import_module(package + ".diffbias_core.toy.diffusion")
    display = import_module(package + ".diffbias_core.toy.display")
    train = import_module(package + ".diffbias_core.toy.train")
    world = import_module(package + ".diffbias_core.toy.world")
    edits = import_module(package + ".diffbias_core.toy.edits")
    sampling = import_module(package + ".diffbias_core.toy.sampling")
    oracles = import_module(package + ".diffbias_core.toy.oracles")
    mapping = nodes.NODE_CLASS_MAPPINGS
    model, clip, vae = node(mapping, "DiffBiasLoadToyWorld")
    results: dict = {"family": None}
    info = import_module(package + ".nodes.model_info")
    described = info.describe(model)
    results["family"] = described.family
    results["hooks"] = list(described.hooks)
    results["middle_width"] = info.hook_width(model, info.parse_hook("unet.middle"))
    unet, _ = train.load_model()
    positive = nodes.CLIPTextEncode().encode(clip, "a circle")[0]
    results["cond_shape"] = list(positive[0][0].shape)
    shape = torch.zeros(BATCH, dtype=torch.long)
    noise = diffusion.initial_noise(BATCH, 16, SEED)
    with torch.no_grad():
        reference = diffusion.ddim_sample(unet, world.tokens(shape), noise, STEPS)  # (B, 3, 16, 16) [-1, 1]
    ref_reading = oracles.read(reference)
    results["samplers"] = {}
    for sampler, scheduler in (("euler", "simple"), ("ddim", "simple"), ("euler", "normal"),
                               ("dpmpp_2m", "karras"), ("uni_pc", "simple")):  # fmt: skip
        latent = ksampler(model, positive, sampler, scheduler)
        pictures = vae.decode(latent["samples"])  # (B, 128, 128, 3)
        images = display.picture_to_world(pictures, 16)
        reading = oracles.read(images)
        results["samplers"][f"{sampler}/{scheduler}"] = {
            "max_abs_diff": float((images - reference).abs().max()),
            "mean_abs_diff": float((images - reference).abs().mean()),
            "colour_agreement": float((reading.colour == ref_reading.colour).float().mean()),
            "shape_agreement": float((reading.shape == ref_reading.shape).float().mean()),
        }
    results["picture_shape"] = list(pictures.shape)
    # VAE round trip: encode the decoded pictures and decode again.
    again = vae.decode(vae.encode(pictures))
    results["vae_round_trip_max_diff"] = float((again - pictures).abs().max())

    # The intervention through Apply Feature Intervention (push every image to blue) equals the toy's own
    # feature edit at unet.middle, window 10%-90% of the steps (start 0.05, end 0.85 in sigma terms).
    sae_wire_type = import_module(package + ".nodes.wires").SaeWire
    dissect = import_module(package + ".diffbias_core.toy.dissect")
    shipped = import_module(package + ".nodes.files").shipped_path
    sae = dissect.load_toy_sae(Path(shipped(dissect.SAE_FILE)))
    features = core.load_features(shipped("toy_world.colour.features.safetensors"))
    patched = node(mapping, "DiffBiasApplyIntervention", model=model, sae=sae_wire_type(sae, "shipped"),
                   features=features, mode="push", target="blue", edit="add", strength=2.5, top_k=30,
                   start_percent=0.05, end_percent=0.85, cond_only=True, seed=0)[0]  # fmt: skip
    latent = ksampler(patched, positive, "euler", "simple")
    pushed = display.picture_to_world(vae.decode(latent["samples"]), 16)
    blue = torch.full((BATCH,), world.COLOURS.index("blue"))
    spec = core.EditSpec(mode="add", strength=2.5, top_k=30)
    edit = edits.feature_edit(sae, features, blue, spec, edits.Window(0.1, 0.9))
    with torch.no_grad():
        core_pushed = sampling.generate(unet, world.tokens(shape), noise, STEPS, edit=edit)
    results["push_vs_core_max_diff"] = float((pushed - core_pushed).abs().max())
    results["push_blue_rate"] = float((oracles.read(pushed).colour == blue).float().mean())
    results["plain_blue_rate"] = float((ref_reading.colour == blue).float().mean())
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
