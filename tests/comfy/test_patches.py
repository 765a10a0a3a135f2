"""Patch-level behaviour in a real ComfyUI process (tiny random UNet and Flux; see patch_checks.py)."""

from __future__ import annotations

import json

import pytest

from .conftest import run_comfy_script


@pytest.fixture(scope="module")
def results(comfyui) -> dict:
    output = run_comfy_script(comfyui, "patch_checks.py")
    line = next(line for line in output.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


def test_patched_model_edits_and_leaves_the_input_model_alone(results):
    assert results["patched_image_differs"], "the intervention changed nothing: the test cannot see edits"
    assert results["unpatched_same_before_and_after"]
    assert results["input_model_unpatched"]


def test_cond_only_leaves_the_uncond_prediction_bit_identical(results):
    assert results["cond_only_uncond_identical"]
    assert results["cond_only_cond_changed"]
    assert results["cond_and_uncond_uncond_changed"], "with cond_only off the uncond half must be edited"


def test_neutral_strength_is_bit_identical(results):
    assert results["neutral_node_returns_input"]
    assert results["neutral_image_identical"]
    assert results["neutral_patch_image_identical"]


def test_schedule_window_gates_the_edit(results):
    assert results["outside_window_identical"]


def test_clone_shares_patch_and_weights_and_to_returns_self(results):
    assert results["clone_shares_patch"]
    assert results["clone_shares_sae_weights"]
    assert results["to_returns_self"]
    assert results["compute_dtype_follows_to"]


def test_class_assignment_is_stratified_and_reproducible(results):
    assert results["batch8_counts"] == [4, 4]
    assert results["assignment_reproducible"]
    assert results["assignment_changes_with_seed"]


def test_stacked_interventions_have_their_own_keys(results):
    assert results["stacked_keys"] == ["diffbias_intervention_0", "diffbias_intervention_1"]
    assert results["stacked_race_counts"] == [2, 2, 2, 2]


def test_flux_double_block_edits_image_tokens_only(results):
    assert results["double_txt_identical"]
    assert results["double_img_changed"]


def test_flux_single_block_edits_image_tokens_only(results):
    assert results["single_txt_identical"]
    assert results["single_img_changed_everywhere"]


def test_missing_sae_folder_says_where_to_create_it(results):
    for key in ("missing_folder_validation", "missing_folder_error"):
        message = results[key]
        assert "/nonexistent/diffbias/models/sae" in message and "create it" in message, message


def test_cancelled_training_keeps_a_valid_file(results):
    assert results["interrupt_raised"], "Train Bias SAE did not stop on Cancel"
    assert results["interrupt_model_calls"] < 16, "sampling went on after Cancel"
    assert results["interrupt_file_written"]
    assert results["interrupt_file_sae"] == [64, 64, 4, "unet.middle", "sd15"]
    assert results["interrupt_file_steps"] > 0
