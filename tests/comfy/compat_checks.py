"""The plugin takes the calls that newer ComfyUI makes (docs/comfyui-compat.md), checked inside this ComfyUI.

Run by tests/comfy/test_compat.py as ``python compat_checks.py`` with cwd = ComfyUI and the torchvision stub on
PYTHONPATH; the plugin is loaded by ComfyUI's own loader. Each check raises AssertionError saying what
differed, or prints one ``ok:`` line.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import comfy.cli_args
import torch

comfy.cli_args.args.cpu = True

import comfy.model_management  # noqa: E402, F401  (after args.cpu)
import comfy.model_patcher  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.samplers  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's own nodes module)

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def load_intervention():
    """The plugin's nodes.intervention_run module, as ComfyUI's loader imports the plugin."""
    if not asyncio.run(nodes.load_custom_node(str(REPO))):
        raise RuntimeError(f"ComfyUI's loader did not load the plugin at {REPO}")
    package = sys.modules[str(REPO).replace(".", "_x_")]
    return sys.modules[package.__name__ + ".nodes.intervention_run"]


class SamplingOnly(torch.nn.Module):
    """A model that holds only what the OUTER_SAMPLE wrapper reads: ComfyUI's own discrete model sampling."""

    def __init__(self) -> None:
        super().__init__()
        self.model_sampling = comfy.model_sampling.ModelSamplingDiscrete()


def check_outer_sample_hands_on_later_arguments(patching) -> None:
    """ComfyUI 0.38 calls OUTER_SAMPLE wrappers with ``latent_shapes=`` after ``seed``; 0.3.64 without it.

    Both calls go through this ComfyUI's WrapperExecutor to a real CFGGuider's class object; the wrapper must
    hand the extra argument on, set the run's classes while the inner call runs, and remove them afterwards.
    """
    key = f"{patching.INTERVENTION_KEY}_0"
    plan = patching.ClassPlan((1.0, 1.0), None, 5, "0:male,female")
    wrapper = patching.InterventionWrapper(key, plan, 0.0, 1.0)
    guider = comfy.samplers.CFGGuider(comfy.model_patcher.ModelPatcher(SamplingOnly(), CPU, CPU))
    noise = torch.zeros(4, 4, 8, 8)  # (B, C, h, w)
    seen: dict = {}

    def outer_sample(
        noise,
        latent_image,
        sampler,
        sigmas,
        denoise_mask=None,
        callback=None,
        disable_pbar=False,
        seed=None,
        latent_shapes=None,
    ):
        seen["latent_shapes"] = latent_shapes
        seen["state"] = guider.model_options["transformer_options"].get(key)
        return latent_image

    for later in ({}, {"latent_shapes": [noise.shape]}):
        seen.clear()
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(outer_sample, guider, [wrapper])
        executor.execute(noise, noise, None, torch.linspace(14.6, 0.0, 3), None, None, True, 42, **later)
        call = f"OUTER_SAMPLE call with {sorted(later) or 'no arguments'} after seed"
        assert seen.get("latent_shapes") == later.get("latent_shapes"), (
            f"{call}: the inner call got latent_shapes={seen.get('latent_shapes')!r}, "
            f"expected {later.get('latent_shapes')!r}"
        )
        state = seen.get("state")
        assert state is not None, f"{call}: no run state under {key!r} while the inner call ran"
        expected = plan.classes(noise.shape[0], 42)
        assert torch.equal(state.image_class, expected), (
            f"{call}: image classes {state.image_class.tolist()}, expected {expected.tolist()}"
        )
        assert key not in guider.model_options["transformer_options"], f"{call}: run state left behind"
        print(f"ok: {call}: handed on, classes {expected.tolist()}, state removed")


if __name__ == "__main__":
    check_outer_sample_hands_on_later_arguments(load_intervention())
