"""The toy world as ComfyUI's MODEL, CLIP and VAE (Load Toy World): the stock KSampler takes the toy's own
DDIM steps, the VAE is exact, and Apply Feature Intervention edits its middle block as the core does."""

from __future__ import annotations

import pytest
import torch

STEPS = 10
SEED = 3
BATCH = 12


@pytest.fixture(scope="module")
def toy(plugin):
    """(MODEL, CLIP, VAE) from the Load Toy World node, and the plugin's toy core modules by name."""
    model, clip, vae = plugin.node_classes["DiffBiasLoadToyWorld"].execute().result
    names = ("diffusion", "display", "train", "world", "edits", "sampling", "oracles", "dissect", "demo")
    modules = {name: plugin.module(f"diffbias_core.toy.{name}") for name in names}
    return model, clip, vae, modules


def _ksampler(model, positive, sampler: str, scheduler: str):
    import nodes

    latent = nodes.EmptyLatentImage().generate(128, 128, BATCH)[0]
    return nodes.common_ksampler(model, SEED, STEPS, 1.0, sampler, scheduler, positive, positive, latent)[0]


def _reference(toy, colour_edit=None):
    """The toy's own DDIM of 'a circle' from KSampler's noise (the same torch.randn from the seed)."""
    _, _, _, m = toy
    unet, _ = m["train"].load_model()
    noise = m["diffusion"].initial_noise(BATCH, 16, SEED)
    prompt = m["world"].tokens(torch.zeros(BATCH, dtype=torch.long))
    with torch.no_grad():
        return m["sampling"].generate(unet, prompt, noise, STEPS, edit=colour_edit)


def _images(toy, latent):
    _, _, vae, m = toy
    return m["display"].picture_to_world(vae.decode(latent["samples"]), 16)


def test_toy_world_is_an_ordinary_unet_to_the_plugin(plugin, toy):
    model, clip, _, _ = toy
    info = plugin.module("nodes.model_info")
    described = info.describe(model)
    assert described.family == "toy" and described.architecture == "unet"
    assert "unet.middle" in described.hooks
    assert info.hook_width(model, info.parse_hook("unet.middle")) == 64
    import nodes

    cond = nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
    assert list(cond[0][0].shape) == [1, 2, 32]
    with pytest.raises(ValueError, match="hexagon"):
        nodes.CLIPTextEncode().encode(clip, "a hexagon")


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_ksampler_with_the_simple_scheduler_takes_the_toy_ddim_steps(toy, sampler):
    import nodes

    model, clip, _, _ = toy
    positive = nodes.CLIPTextEncode().encode(clip, "a circle")[0]
    images = _images(toy, _ksampler(model, positive, sampler, "simple"))
    difference = (images - _reference(toy)).abs()
    print(f"{sampler}/simple vs toy DDIM: mean |diff| {difference.mean():.2e}, max {difference.max():.3f}")
    assert difference.mean() < 1e-3 and difference.max() < 0.1


@pytest.mark.parametrize(
    ("sampler", "scheduler"), [("euler", "normal"), ("dpmpp_2m", "karras"), ("uni_pc", "simple")]
)
def test_other_samplers_draw_the_same_scenes(toy, sampler, scheduler):
    import nodes

    model, clip, _, m = toy
    positive = nodes.CLIPTextEncode().encode(clip, "a circle")[0]
    reading = m["oracles"].read(_images(toy, _ksampler(model, positive, sampler, scheduler)))
    reference = m["oracles"].read(_reference(toy))
    assert (reading.colour == reference.colour).float().mean() >= 0.9
    assert (reading.shape == reference.shape).float().mean() >= 0.9


def test_vae_round_trip_is_exact(toy):
    _, _, vae, m = toy
    latent = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    pictures = vae.decode(latent)
    assert pictures.shape == (2, 128, 128, 3)
    torch.testing.assert_close(vae.decode(vae.encode(pictures)), pictures, atol=1e-6, rtol=0)


def test_apply_feature_intervention_edits_the_middle_block_as_the_core_does(plugin, toy):
    import nodes

    model, clip, _, m = toy
    files = plugin.module("nodes.files")
    sae = m["dissect"].load_toy_sae(files.shipped_path(m["dissect"].SAE_FILE))
    features = plugin.core.load_features(files.shipped_path(m["demo"].FEATURES_FILE))
    wire = plugin.module("nodes.wires").SaeWire(sae, "shipped")
    patched = plugin.node_classes["DiffBiasApplyIntervention"].execute(
        model=model, sae=wire, features=features, mode="push", target="blue", edit="add", strength=2.5,
        top_k=30, start_percent=0.05, end_percent=0.85, cond_only=True, seed=0,
    ).result[0]  # fmt: skip
    positive = nodes.CLIPTextEncode().encode(clip, "a circle")[0]
    pushed = _images(toy, _ksampler(patched, positive, "euler", "simple"))
    blue = torch.full((BATCH,), m["world"].COLOURS.index("blue"))
    spec = plugin.core.EditSpec(mode="add", strength=2.5, top_k=30)
    edit = m["edits"].feature_edit(sae, features, blue, spec, m["edits"].Window(0.1, 0.9))  # steps 2-9 of 10
    core_pushed = _reference(toy, colour_edit=edit)
    plain = m["oracles"].read(_reference(toy)).colour
    assert (plain == blue).float().mean() < 0.5, "circles are rarely blue: the push must be visible"
    assert (m["oracles"].read(pushed).colour == blue).float().mean() >= 0.9
    assert (pushed - core_pushed).abs().max() < 0.1
