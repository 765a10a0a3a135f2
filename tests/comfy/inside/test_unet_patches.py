"""Apply Feature Intervention on ComfyUI's SD15 model class (tiny UNet, h-space hook), sampled by
ComfyUI's sampler with the random SD1.5 checkpoint's real CLIP conditioning."""

from __future__ import annotations

import pytest
import torch

from .harness import assert_differs, assert_identical, run_classes, tiny_unet

HOOK, FAMILY, WIDTH = "unet.middle", "sd15", 64  # the tiny UNet's bottleneck: 64 channels


@pytest.fixture(scope="module")
def conds(sd15_clip):
    """(positive, negative) from the checkpoint's CLIP-L: [[(1, 77, 768), {"pooled_output": ...}]]."""

    def encode(text):
        return sd15_clip.encode_from_tokens_scheduled(sd15_clip.tokenize(text))

    return encode("a photo of a person"), encode("")


@pytest.fixture(scope="module")
def setup(make_sae, make_features):
    model = tiny_unet(seed=0)
    sae = make_sae(WIDTH, HOOK, FAMILY)
    return model, sae, make_features(sae)


def latent(batch=2):
    return torch.zeros(batch, 4, 4, 4)  # (batch, latent channels, 32 px / 8, 32 px / 8)


def test_patched_model_edits_and_leaves_the_input_model_alone(setup, conds, sample, apply_intervention):
    model, sae, features = setup
    before = sample(model, *conds, latent())
    edited = sample(apply_intervention(model, sae, features), *conds, latent())
    assert_differs(edited, before, "the intervened sample")
    assert_identical(
        sample(model, *conds, latent()), before, "the input model's sample after patching a clone"
    )
    options = model.model_options["transformer_options"]
    assert "patches" not in options, f"the input model got patches: {sorted(options.get('patches', {}))}"


def test_cond_only_leaves_the_uncond_prediction_bit_identical(setup, conds, apply_intervention):
    from .harness import first_step_predictions

    model, sae, features = setup
    cond_plain, uncond_plain = first_step_predictions(model, *conds, latent())
    cond_edit, uncond_edit = first_step_predictions(
        apply_intervention(model, sae, features), *conds, latent()
    )
    assert_identical(uncond_edit, uncond_plain, "the uncond prediction with cond_only on")
    assert_differs(cond_edit, cond_plain, "the cond prediction with cond_only on")
    both = apply_intervention(model, sae, features, cond_only=False)
    assert_differs(
        first_step_predictions(both, *conds, latent())[1],
        uncond_plain,
        "the uncond prediction with cond_only off",
    )


def test_neutral_strength_returns_the_input_model(setup, apply_intervention):
    model, sae, features = setup
    for edit, strength in (("add", 0.0), ("scale", 1.0)):
        neutral = apply_intervention(model, sae, features, edit=edit, strength=strength)
        assert neutral is model, (
            f"edit={edit} strength={strength} returned a patched copy, not the input model"
        )


def test_an_installed_neutral_edit_is_bit_identical(setup, conds, sample, plugin, core):
    """The patch itself, installed although neutral (scale 1), leaves every sample bit-identical."""
    model, sae, features = setup
    forced = plugin.module("nodes.intervention_run").add_intervention(
        model,
        plugin.module("nodes.model_info").parse_hook(HOOK),
        sae,
        features,
        core.EditSpec(mode="scale", strength=1.0, top_k=6),
        weights=(1.0, 1.0),
        fixed=None,
        seed=0,
        window=(0.0, 1.0),
        cond_only=False,
    )
    assert "patches" in forced.model_options["transformer_options"], "add_intervention installed no patch"
    assert_identical(
        sample(forced, *conds, latent()), sample(model, *conds, latent()), "the sample with a neutral edit"
    )


def test_schedule_window_gates_the_edit(setup, conds, sample, apply_intervention):
    model, sae, features = setup
    late = apply_intervention(model, sae, features, start_percent=0.999, end_percent=1.0)
    inside = apply_intervention(model, sae, features, start_percent=0.0, end_percent=0.5)
    plain = sample(model, *conds, latent(), steps=1)
    assert_identical(
        sample(late, *conds, latent(), steps=1), plain, "a 1-step sample with the window 0.999..1"
    )
    assert_differs(sample(inside, *conds, latent(), steps=1), plain, "a 1-step sample with the window 0..0.5")


def test_clone_shares_the_patch_and_its_weights(setup, apply_intervention):
    model, sae, features = setup
    for edit in ("add", "scale"):
        patched = apply_intervention(model, sae, features, edit=edit, strength=3.0)
        clone = patched.clone()
        patches = patched.model_options["transformer_options"]["patches"]["output_block_patch"]
        cloned = clone.model_options["transformer_options"]["patches"]["output_block_patch"]
        assert cloned[0] is patches[0], (
            f"{edit}: clone() copied the patch: {cloned[0]!r} is not {patches[0]!r}"
        )
        weights = cloned[0].fn.weights.model  # the edit's EditWeights, held by its ModelPatcher
        if edit == "add":
            assert weights.sae is None, "an add edit with others kept must not hold the SAE"
            assert weights.tables.delta.shape == (2, WIDTH), f"deltas {tuple(weights.tables.delta.shape)}"
        else:
            assert weights.sae.W_dec.data_ptr() == sae.W_dec.data_ptr(), "the float32 copy copied the weights"


def test_the_patch_lists_its_weights_for_comfyui_to_load(setup, apply_intervention):
    """ComfyUI asks every patch for models(): the edit's weights are a ModelPatcher sized as its module, found
    through the model's own model_patches_models() (what load_models_gpu reads)."""
    import comfy.model_management

    model, sae, features = setup
    patched = apply_intervention(model, sae, features, edit="scale", strength=2.0)
    patch = patched.model_options["transformer_options"]["patches"]["output_block_patch"][0]
    assert patch.to(torch.device("cpu")) is patch and patch.to(torch.float16) is patch, (
        ".to() must return itself"
    )
    listed = patched.model_patches_models()
    assert listed == [patch.fn.weights], f"model_patches_models() gave {listed}"
    module = patch.fn.weights.model
    assert patch.fn.weights.model_size() == comfy.model_management.module_size(module) > sae.W_enc.nbytes


def test_class_assignment_is_stratified_and_reproducible(setup, conds, plugin, apply_intervention):
    model, sae, features = setup
    patched = apply_intervention(model, sae, features)
    first = run_classes(plugin, patched, *conds, latent(8), seed=11)
    assert len(first) == 1, f"one intervention expected, the run state holds {sorted(first)}"
    labels = next(iter(first.values()))
    assert [labels.count(0), labels.count(1)] == [4, 4], f"batch of 8 over two equal classes got {labels}"
    again = run_classes(plugin, patched, *conds, latent(8), seed=11)
    assert again == first, f"the same seed drew {again}, first {first}"
    others = {seed: run_classes(plugin, patched, *conds, latent(8), seed=seed) for seed in (12, 13, 14)}
    assert any(o != first for o in others.values()), f"seeds 11..14 all drew {first}"


def test_stacked_interventions_have_their_own_keys(setup, conds, plugin, make_features, apply_intervention):
    model, sae, gender = setup
    race = make_features(sae, ("white", "black", "asian", "indian"))
    stacked = apply_intervention(apply_intervention(model, sae, gender), sae, race)
    seen = run_classes(plugin, stacked, *conds, latent(8), seed=11)
    key = plugin.module("nodes.patching").INTERVENTION_KEY
    assert sorted(seen) == [f"{key}_0", f"{key}_1"], f"run state keys {sorted(seen)}"
    race_labels = seen[f"{key}_1"]
    assert [race_labels.count(c) for c in range(4)] == [2, 2, 2, 2], (
        f"8 images over 4 races got {race_labels}"
    )
    gender_labels = seen[f"{key}_0"]
    assert [gender_labels.count(c) for c in range(2)] == [4, 4], (
        f"8 images over 2 genders got {gender_labels}"
    )
