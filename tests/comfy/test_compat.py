"""Calls that newer ComfyUI makes into the plugin, made against the pinned ComfyUI (see compat_checks.py and
docs/comfyui-compat.md)."""

from __future__ import annotations

from .conftest import run_comfy_script


def test_intervention_wrapper_takes_the_newer_outer_sample_call(comfyui):
    output = run_comfy_script(comfyui, "compat_checks.py", timeout=300)
    assert output.count("ok: OUTER_SAMPLE call") == 2, output
