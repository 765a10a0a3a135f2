"""Tests that run inside a ComfyUI process: the plugin as ComfyUI's loader imports it, ComfyUI's own
model classes and sampler, on the CPU.

How it runs (child_session.py): the README's ``python -m pytest`` collects the test functions of this
folder and runs them all in ONE child pytest session in a ComfyUI process (cwd = ``$COMFYUI_PATH``, the
torchvision stub and ComfyUI on ``PYTHONPATH``); each test is reported on its own in the parent, with
the child's failure text. Without ``COMFYUI_PATH`` they are skipped with the reason, like every test
under tests/comfy.

Writing a test here: a module ``test_*.py`` in this folder, using the fixtures below. Never import
``comfy``, ``nodes``, ``folder_paths`` or ``diffbias_core`` at a test module's top (the parent session
imports the module without ComfyUI; the core under test is ``plugin.core``, the plugin's own copy);
import ComfyUI modules inside the test or through ``harness.py``'s functions: ``tiny_model`` (any
``comfy.supported_models`` class from a small config; ``tiny_unet`` with ``tiny_latent``, ``tiny_flux``),
``random_conds``, ``first_step_predictions`` (cond / uncond of step 1), ``dit_block_inputs`` (what a DiT block
receives), ``run_classes`` (per-image classes of a run), ``assert_identical`` / ``assert_differs`` (messages that say
what differed and by how much).
"""

from __future__ import annotations

import pytest

from . import child_session, harness

if child_session.in_child():
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before the first import of comfy.model_management
    import comfy.model_management  # noqa: E402, F401
    import utils.extra_config  # noqa: E402, F401  (before nodes: nodes puts comfy/ first on sys.path)

    import nodes  # noqa: E402, F401  (ComfyUI's nodes module: cwd is ComfyUI)

    def pytest_runtest_logreport(report):
        child_session.write_report(report)

else:

    @pytest.hookimpl(wrapper=True)
    def pytest_pycollect_makeitem(collector, name, obj):
        items = yield
        return None if items is None else child_session.make_proxies(collector, items)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item, call):
        report = yield
        if isinstance(item, child_session.ChildResult):  # --durations shows the child's time per test
            duration = item.child_duration(report.when)
            report.duration = report.duration if duration is None else duration
        return report


@pytest.fixture(scope="session")
def plugin():
    """The plugin loaded by ``nodes.load_custom_node`` (harness.Plugin: package, core, node_classes)."""
    return harness.load_plugin()


@pytest.fixture(scope="session")
def core(plugin):
    """The plugin's own ``diffbias_core`` (``plugin.core``): SparseAutoencoder, FeatureSet, EditSpec, ..."""
    return plugin.core


@pytest.fixture(scope="session")
def patcher():
    """``patcher(base_model) -> ModelPatcher`` on the CPU (base_model: a comfy.model_base.BaseModel)."""
    return harness.patcher


@pytest.fixture(scope="session")
def sample():
    """``sample(model, positive, negative, latent, *, steps=2, cfg=5.0, seed=7, sampler_name, scheduler)``
    through ComfyUI's sampler; returns the sampled latent (harness.sample)."""
    return harness.sample


@pytest.fixture(scope="session")
def make_sae(core):
    """``make_sae(width, hook, family, latents=96, k=8, seed=0)``: a seeded random SAE of the plugin's core."""
    return lambda width, hook, family, **options: harness.make_sae(core, width, hook, family, **options)


@pytest.fixture(scope="session")
def make_features(core):
    """``make_features(sae, classes=("male", "female"), per_class=6, seed=3)``: a FeatureSet on ``sae``."""
    return lambda sae, classes=("male", "female"), **options: harness.make_features(
        core, sae, classes, **options
    )


@pytest.fixture(scope="module")
def unet_setup(make_sae, make_features):
    """(tiny_unet(seed=0), a seeded SAE at its bottleneck, male/female features on it), one per test module."""
    sae = make_sae(harness.TINY_UNET_WIDTH, harness.TINY_UNET_HOOK, harness.TINY_UNET_FAMILY)
    return harness.tiny_unet(seed=0), sae, make_features(sae)


@pytest.fixture(scope="session")
def apply_intervention(plugin):
    """``apply_intervention(model, sae, features, **widgets)``: the Apply Feature Intervention node's MODEL
    (widgets default to harness.APPLY_DEFAULTS)."""
    return lambda model, sae, features, **widgets: harness.apply_intervention(
        plugin, model, sae, features, **widgets
    )


@pytest.fixture(scope="session")
def sd15_clip(sd15_checkpoint):
    """The real CLIP-L text encoder of the random SD1.5 checkpoint, loaded by ComfyUI's checkpoint loader."""
    import comfy.sd

    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(sd15_checkpoint), output_vae=False, output_clip=True, output_model=False
    )
    if clip is None:
        raise AssertionError(f"ComfyUI found no text encoder in {sd15_checkpoint}")
    return clip


@pytest.fixture
def sae_folder(monkeypatch):
    """``sae_folder(*paths)``: make ComfyUI's ``sae`` model folder list ``paths`` for this test only."""
    import folder_paths

    def point(*paths):
        monkeypatch.setitem(
            folder_paths.folder_names_and_paths, "sae", ([str(p) for p in paths], {".safetensors"})
        )

    return point
