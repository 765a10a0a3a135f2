"""Apply Feature Intervention on ComfyUI's SD15 model class (tiny UNet, h-space hook), sampled by
ComfyUI's sampler with the random SD1.5 checkpoint's real CLIP conditioning."""

from __future__ import annotations

import pytest
import torch

from .harness import (
    TINY_UNET_HOOK,
    TINY_UNET_WIDTH,
    assert_differs,
    assert_identical,
    run_classes,
    tiny_latent,
)

HOOK, WIDTH = TINY_UNET_HOOK, TINY_UNET_WIDTH


@pytest.fixture(scope="module")
def conds(sd15_clip):
    """(positive, negative) from the checkpoint's CLIP-L: [[(1, 77, 768), {"pooled_output": ...}]]."""

    def encode(text):
        return sd15_clip.encode_from_tokens_scheduled(sd15_clip.tokenize(text))

    return encode("a photo of a person"), encode("")


def test_patched_model_edits_and_leaves_the_input_model_alone(unet_setup, conds, sample, apply_intervention):
    model, sae, features = unet_setup
    before = sample(model, *conds, tiny_latent())
    edited = sample(apply_intervention(model, sae, features), *conds, tiny_latent())
    assert_differs(edited, before, "the intervened sample")
    assert_identical(
        sample(model, *conds, tiny_latent()), before, "the input model's sample after patching a clone"
    )
    options = model.model_options["transformer_options"]
    assert "patches" not in options, f"the input model got patches: {sorted(options.get('patches', {}))}"


def test_cond_only_leaves_the_uncond_prediction_bit_identical(unet_setup, conds, apply_intervention):
    from .harness import first_step_predictions

    model, sae, features = unet_setup
    cond_plain, uncond_plain = first_step_predictions(model, *conds, tiny_latent())
    cond_edit, uncond_edit = first_step_predictions(
        apply_intervention(model, sae, features), *conds, tiny_latent()
    )
    assert_identical(uncond_edit, uncond_plain, "the uncond prediction with cond_only on")
    assert_differs(cond_edit, cond_plain, "the cond prediction with cond_only on")
    both = apply_intervention(model, sae, features, cond_only=False)
    assert_differs(
        first_step_predictions(both, *conds, tiny_latent())[1],
        uncond_plain,
        "the uncond prediction with cond_only off",
    )


def test_neutral_strength_returns_the_input_model(unet_setup, apply_intervention):
    model, sae, features = unet_setup
    for edit, strength in (("add", 0.0), ("scale", 1.0)):
        neutral = apply_intervention(model, sae, features, edit=edit, strength=strength)
        assert neutral is model, (
            f"edit={edit} strength={strength} returned a patched copy, not the input model"
        )


def test_an_installed_neutral_edit_is_bit_identical(unet_setup, conds, sample, plugin, core):
    """The patch itself, installed although neutral (scale 1), leaves every sample bit-identical."""
    model, sae, features = unet_setup
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
        sample(forced, *conds, tiny_latent()),
        sample(model, *conds, tiny_latent()),
        "the sample with a neutral edit",
    )


def test_schedule_window_gates_the_edit(unet_setup, conds, sample, apply_intervention):
    model, sae, features = unet_setup
    late = apply_intervention(model, sae, features, start_percent=0.999, end_percent=1.0)
    inside = apply_intervention(model, sae, features, start_percent=0.0, end_percent=0.5)
    plain = sample(model, *conds, tiny_latent(), steps=1)
    assert_identical(
        sample(late, *conds, tiny_latent(), steps=1), plain, "a 1-step sample with the window 0.999..1"
    )
    assert_differs(
        sample(inside, *conds, tiny_latent(), steps=1), plain, "a 1-step sample with the window 0..0.5"
    )


def test_clone_shares_the_patch_and_its_weights(unet_setup, apply_intervention):
    model, sae, features = unet_setup
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


def test_the_patch_lists_its_weights_for_comfyui_to_load(unet_setup, apply_intervention):
    """ComfyUI asks every patch for models(): the edit's weights are a ModelPatcher sized as its module, found
    through the model's own model_patches_models() (what load_models_gpu reads)."""
    import comfy.model_management

    model, sae, features = unet_setup
    patched = apply_intervention(model, sae, features, edit="scale", strength=2.0)
    patch = patched.model_options["transformer_options"]["patches"]["output_block_patch"][0]
    assert patch.to(torch.device("cpu")) is patch and patch.to(torch.float16) is patch, (
        ".to() must return itself"
    )
    listed = patched.model_patches_models()
    assert listed == [patch.fn.weights], f"model_patches_models() gave {listed}"
    module = patch.fn.weights.model
    assert patch.fn.weights.model_size() == comfy.model_management.module_size(module) > sae.W_enc.nbytes


def test_class_assignment_is_stratified_and_reproducible(unet_setup, conds, plugin, apply_intervention):
    model, sae, features = unet_setup
    patched = apply_intervention(model, sae, features)
    first = run_classes(plugin, patched, *conds, tiny_latent(8), seed=11)
    assert len(first) == 1, f"one intervention expected, the run state holds {sorted(first)}"
    labels = next(iter(first.values()))
    assert [labels.count(0), labels.count(1)] == [4, 4], f"batch of 8 over two equal classes got {labels}"
    again = run_classes(plugin, patched, *conds, tiny_latent(8), seed=11)
    assert again == first, f"the same seed drew {again}, first {first}"
    others = {seed: run_classes(plugin, patched, *conds, tiny_latent(8), seed=seed) for seed in (12, 13, 14)}
    assert any(o != first for o in others.values()), f"seeds 11..14 all drew {first}"


def test_stacked_interventions_have_their_own_keys(
    unet_setup, conds, plugin, make_features, apply_intervention
):
    model, sae, gender = unet_setup
    race = make_features(sae, ("white", "black", "asian", "indian"))
    stacked = apply_intervention(apply_intervention(model, sae, gender), sae, race)
    seen = run_classes(plugin, stacked, *conds, tiny_latent(8), seed=11)
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
