"""Sampling memory of an encoder-free kernel-8 edit in a real ComfyUI (issue 12): it reads only the decoder rows
it adds, so the peak RSS of a sampling run grows by far less than the SAE file (memory_checks.py measures)."""

from __future__ import annotations

import json

import pytest

from .conftest import run_comfy_script


def _results(comfyui, *args) -> dict:
    output = run_comfy_script(comfyui, "memory_checks.py", *args)
    return json.loads(
        next(line for line in output.splitlines() if line.startswith("RESULTS ")).removeprefix("RESULTS ")
    )


@pytest.fixture(scope="module")
def measured(comfyui, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("kernel8") / "kernel8.safetensors"
    _results(comfyui, "make", str(path))
    try:
        return _results(comfyui, "measure", str(path))
    finally:
        path.unlink()


def test_an_encoder_free_kernel8_edit_adds_under_1_percent_of_the_file_to_the_sampling_peak(measured):
    size = measured["file_bytes"]
    noise = measured["unpatched_2"] - measured["unpatched_1"]
    added = measured["add"] - measured["unpatched_2"]
    summary = (f"file {size / 2**20:.1f} MiB; peak RSS unpatched {measured['unpatched_2'] / 2**20:.1f} MiB (second "
               f"run {noise / 2**20:+.2f} MiB), add {added / 2**20:+.2f} MiB, scale "
               f"{(measured['scale'] - measured['add']) / 2**20:+.1f} MiB more")  # fmt: skip
    print(summary)
    assert measured["add_changed"], "the add edit changed nothing: the measurement would not be of an edit"
    assert not measured["add_loaded_whole_sae"], "the add edit loaded the whole SAE"
    assert added < 0.01 * size, summary
    assert measured["scale"] - measured["add"] > 0.5 * size, (
        "the scale edit (whole SAE in memory) must show in the same measurement, else it resolves nothing: "
        + summary
    )
