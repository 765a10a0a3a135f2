"""Node behaviour that needs ComfyUI's runtime: a missing model folder, and Cancel during Train Bias SAE
(tiny UNet, the random SD1.5 checkpoint's real CLIP-L)."""

from __future__ import annotations

from .harness import tiny_unet

MISSING = "/nonexistent/diffbias/models/sae"


def test_missing_sae_folder_says_where_to_create_it(plugin, sae_folder):
    sae_folder(MISSING)
    load = plugin.node_classes["DiffBiasLoadSAE"]
    validation = load.validate_inputs(sae_name="x.safetensors")
    assert isinstance(validation, str) and MISSING in validation and "create it" in validation, (
        f"validate_inputs returned {validation!r}"
    )
    try:
        load.execute(sae_name="x.safetensors")
    except FileNotFoundError as error:
        message = str(error)
    else:
        raise AssertionError("Load Bias SAE ran with no models/sae folder")
    assert MISSING in message and "create it" in message, message


TRAIN_WIDGETS = (
    "a photo of a person\na photo of a doctor",
    "",
    32,  # width
    32,  # height
    4,  # steps
    5.0,  # cfg
    "euler",
    "normal",
    0,  # seed
    16,  # images
    4,  # batch_size
    "unet.middle",
    64,  # latents
    4,  # k
    "cancelled",
)
"""Train Bias SAE widgets for the tiny UNet: four sampler runs of four steps (16 units of its progress bar)."""
SAMPLING_UNITS = 16


def _train_until_cancelled(plugin, sd15_clip, model) -> None:
    import comfy.model_management

    train = plugin.node_classes["DiffBiasTrainSAE"]
    try:
        train.execute(model, sd15_clip, *TRAIN_WIDGETS)
    except comfy.model_management.InterruptProcessingException:
        return
    raise AssertionError("Train Bias SAE did not stop on Cancel")


def test_cancel_while_sampling_stops_and_writes_nothing(plugin, sd15_clip, sae_folder, tmp_path):
    """Cancel in the third of four sampler runs: the node stops at once; no weights were learned, none written."""
    import comfy.model_management
    import comfy.patcher_extension

    calls = []

    def cancel_later(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # runs of 4 steps (cond + uncond in one call): the 9th call is in the third run
            comfy.model_management.interrupt_current_processing(True)
        return executor(*args, **kwargs)

    model = tiny_unet(seed=0)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_cancel", cancel_later)
    sae_folder(tmp_path)
    try:
        _train_until_cancelled(plugin, sd15_clip, model)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert len(calls) < 16, f"sampling went on after Cancel: {len(calls)} of 16 model calls"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a file was written although nothing was trained"


def test_cancel_while_training_keeps_a_valid_file(plugin, core, sd15_clip, sae_folder, tmp_path):
    """Cancel once sampling is done and training has begun: the file holds the best weights so far."""
    from ..cancel import interrupt_when_progress_passes

    sae_folder(tmp_path)
    with interrupt_when_progress_passes(SAMPLING_UNITS) as seen:
        _train_until_cancelled(plugin, sd15_clip, tiny_unet(seed=0))
    assert max(seen) > SAMPLING_UNITS, f"the progress bar never passed sampling: {seen[-5:]}"
    path = tmp_path / "cancelled.safetensors"
    assert path.is_file(), (
        f"no file written on Cancel; {tmp_path} holds {sorted(p.name for p in tmp_path.iterdir())}"
    )
    sae = core.load_sae(path)
    found = [sae.d_in, sae.num_latents, sae.k, sae.hook, sae.model_family]
    assert found == [64, 64, 4, "unet.middle", "sd15"], f"the saved SAE is {found}"
    assert int(sae.provenance.get("steps", "0")) > 0, f"no optimizer step recorded: {sae.provenance}"
    assert int(sae.provenance["steps"]) < 2000, f"training ran to its end after Cancel: {sae.provenance}"
