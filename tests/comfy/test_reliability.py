"""Reliability of the nodes in a real ComfyUI process: nothing lost, nothing silently wrong (issue 13).

Each test reads one check of reliability_checks.py (a small random UNet, ComfyUI's own sampler and
interrupt flag, a temporary SAE folder) and reads its JSON results.
"""

from __future__ import annotations

import json

import pytest

from .conftest import run_comfy_script


@pytest.fixture(scope="module")
def results(comfyui) -> dict:
    """Every check of reliability_checks.py, run once in one ComfyUI process."""
    output = run_comfy_script(comfyui, "reliability_checks.py")
    line = next(line for line in output.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


def test_reliability_cancel_never_replaces_an_existing_sae(results):
    """Case 1: cancelling Train Bias SAE keeps the SAE of that name and its feature sets: while it samples
    nothing is written; while it trains the partial result goes to <name>.cancelled.safetensors."""
    out = results["cancel_keeps_existing"]
    assert out["sampling_interrupted"], "Cancel while sampling did not stop Train Bias SAE"
    assert out["sampling_model_calls"] < 24, (
        f"sampling went on after Cancel: {out['sampling_model_calls']} calls"
    )
    assert out["sampling_unchanged"], "Cancel while sampling changed the existing SAE"
    assert out["sampling_files"] == ["my_sae.gender.features.safetensors", "my_sae.safetensors"], out
    assert out["interrupted"], "Cancel while training did not stop Train Bias SAE"
    assert out["partial_written"], out["files"]
    assert out["partial_steps"] > 0
    assert out["existing_unchanged"]
    assert out["features_still_match"]


def test_reliability_late_failures_are_checked_before_sampling(results):
    """Case 2: a Train file name whose temporary form is too long, and a kernel-2 SAE at an image size with a
    1x1 bottleneck, fail before the first model call with a message saying what to change."""
    out = results["late_failures_first"]
    assert "exceeds the 255-byte limit" in out["long_name_error"], out["long_name_error"]
    assert out["long_name_model_calls"] == 0
    assert "2x2 kernel" in out["kernel_error"] and "128" in out["kernel_error"], out["kernel_error"]
    assert out["kernel_model_calls"] == 0


def test_reliability_train_never_writes_into_the_feature_namespace(results):
    """Case 6: a Train file_name ending in '.features' is refused before sampling; the feature set survives."""
    out = results["train_name_in_feature_namespace"]
    for name in ("bias.features", "bias.features.safetensors", "bias.FEATURES"):
        assert "names ending in '.features'" in out[name], out
    assert out["model_calls"] == 0
    assert out["unchanged"]


def test_reliability_one_bad_file_never_breaks_the_sae_list(results):
    """Case 12: a crafted layout folder (deeply nested JSON header) does not take Load Bias SAE out of
    /object_info; it is listed, and loading it is a FormatError naming the file."""
    out = results["listing_survives_bad_files"]
    assert "schema_error" not in out, out["schema_error"]
    assert "good.safetensors" in out["choices"] and "crafted/" in out["choices"], out["choices"]
    assert out["load_error"].startswith("FormatError") and "crafted/sae.safetensors" in out["load_error"], out


def test_reliability_hook_override_beyond_any_block_is_refused_at_load(results):
    """Case 13: a hook_override with a 5000-digit or >= 1000 block number is a ValueError naming the hook
    point when the SAE is loaded (not an integer-conversion error, not a late failure)."""
    out = results["hook_override_bounds"]
    for name in ("digits", "beyond"):
        assert out[name].startswith("ValueError") and "hook point" in out[name], out[name][:300]
    assert out["fine"] == ""


def test_reliability_class_prompts_survive_clip_text_encode_syntax(results):
    """Case 8: weights, 'style: x' prefixes, embeddings and escapes reach the text encoder exactly as written
    (only a distinct plain 'name: ' on every line names the classes), and the class names are readable."""
    out = results["prompt_syntax"]
    expected_names = {
        "weights": ["male", "female"],
        "style_prefix": ["male", "female"],
        "embedding": ["male", "female"],
        "embedding_only": ["embedding:male", "embedding:female"],
        "named_with_weights": ["male", "female"],
        "weighted_shared_word": ["man", "woman"],
        "escaped": ["male", "female"],
    }
    for case, names in expected_names.items():
        assert out[case].get("names") == names, (case, out[case])
    written = {
        "weights": ["a photo of a (male:1.2) person", "a photo of a (female:1.2) person"],
        "style_prefix": ["style: watercolor, a male person", "style: watercolor, a female person"],
        "embedding": ["embedding:easynegative a male person", "embedding:easynegative a female person"],
        "embedding_only": ["embedding:male", "embedding:female"],
        "named_with_weights": ["a photo of a (man:1.1)", "a photo of a (woman:1.1)"],
        "weighted_shared_word": [
            "a (photo:0.9) of a man, (sharp:1.3)",
            "a (photo:0.9) of a woman, (sharp:1.3)",
        ],
        "escaped": ["a photo of a \\(male\\) person", "a photo of a \\(female\\) person"],
    }
    for case, prompts in written.items():
        assert out[case]["prompts"] == prompts, (case, out[case])


def test_reliability_apply_refuses_top_k_above_the_features(results):
    """Case 10: Apply Feature Intervention with top_k 5 on a class of 4 features says so."""
    out = results["apply_top_k_above_features"]
    assert "class 'female' has 4; lower top_k to 4" in out["above"], out["above"]
    assert out["equal"] == ""


def test_reliability_cancel_reaches_probe_fitting_and_integrated_gradients(results):
    """Case 14: Cancel after sampling (during the probe fits) or after the probes (during integrated gradients)
    stops Attribute Bias Features there; its progress bar moves through both phases."""
    out = results["attribute_cancel_after_sampling"]
    assert out["probes"] and out["ig"], out
    assert out["ig_last_progress"] < out["ig_total"], out


def test_reliability_attribute_states_and_checks_its_memory(results):
    """Case 15: Attribute streams its activations through ComfyUI's temp folder and says what the run needs
    (RAM at its peak; temporary disk: 2 classes x 4 images x 3 steps x 128 floats with their columns, 12.7
    KiB, and a shard header); a machine reporting 4 KiB of memory or of free disk is refused before the first
    model call; the spool is gone after a run, a refusal, an error after sampling and a cancel while sampling."""
    out = results["attribute_memory"]
    assert out["expected"].endswith("temporary disk 16.7 KiB"), out["expected"]
    assert f"(memory: {out['expected']})" in out["text"], out
    assert 0 < out["spooled_bytes"] <= out["disk"], out
    assert (
        out["refused_ram"].startswith("MemoryError") and "only 4.0 KiB is available" in out["refused_ram"]
    ), out
    assert out["refused_disk"].startswith("OSError") and "of disk in" in out["refused_disk"], out
    assert out["refused_ram_model_calls"] == 0 and out["refused_disk_model_calls"] == 0, out
    assert any(name.startswith("diffbias-activations-") for name in out["spooled_at_error"]), out
    assert out["error"] == "RuntimeError: planted failure" and out["cancelled"], out
    for key in ("left_after_run", "left_after_refusals", "left_after_error_and_cancel"):
        assert not [name for name in out[key] if name.startswith("diffbias-")], (key, out[key])
    assert results["attribute_cancel_after_sampling"]["left_in_temp"] == []
