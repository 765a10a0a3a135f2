"""What an edit holds while sampling, in ComfyUI's own model management: an add edit reads no encoder and equals
the encoder path; the SAE of an encoder edit is a model ComfyUI loads, counts, unloads and frees."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from .harness import TINY_UNET_HOOK, TINY_UNET_WIDTH, assert_differs, first_step_predictions, tiny_latent

HOOK, WIDTH = TINY_UNET_HOOK, TINY_UNET_WIDTH


def conds(seed=4):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]]


def forced(plugin, core, model, sae, features, spec, *, encoder, cond_only=True):
    """``add_intervention`` as the node calls it, with the encoder path chosen by ``encoder``."""
    return plugin.module("nodes.intervention_run").add_intervention(
        model, plugin.module("nodes.model_info").parse_hook(HOOK), sae, features, spec,
        weights=(1.0, 1.0), fixed=None, seed=0, window=(0.0, 1.0), cond_only=cond_only, encoder=encoder,
    )  # fmt: skip


@pytest.mark.parametrize("cond_only", [True, False])
def test_add_without_the_encoder_equals_the_encoder_path(unet_setup, plugin, core, cond_only):
    model, sae, features = unet_setup
    spec = core.EditSpec(mode="add", strength=6.0, top_k=6)
    free = forced(plugin, core, model, sae, features, spec, encoder=None, cond_only=cond_only)
    reference = forced(plugin, core, model, sae, features, spec, encoder=True, cond_only=cond_only)
    weights = free.model_options["transformer_options"]["patches"]["output_block_patch"][0].fn.weights.model
    assert weights.sae is None, "the add edit took the encoder path"
    got, expected = (
        first_step_predictions(free, *conds(), tiny_latent()),
        first_step_predictions(reference, *conds(), tiny_latent()),
    )
    plain = first_step_predictions(model, *conds(), tiny_latent())
    for kind, (a, b, p) in enumerate(zip(got, expected, plain, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        if kind == 0 or not cond_only:
            assert_differs(a, p, f"chunk {kind}: the edited prediction")


def _damage(path, tensor):
    """Flip one byte of ``tensor``'s data in a safetensors file (the header stays valid)."""
    import json

    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8 : 8 + length])[tensor]["data_offsets"][0]
    data[8 + length + begin] ^= 0x40
    path.write_bytes(bytes(data))


def test_an_add_edit_reads_only_decoder_rows_from_the_file(
    unet_setup, plugin, core, tmp_path, apply_intervention
):
    """A file whose encoder is damaged: Load Bias SAE opens it, add edits (never reading the encoder), scale
    needs the encoder and names the damage."""
    model, sae, features = unet_setup
    core.save_sae(sae, tmp_path / "sae.safetensors")
    _damage(tmp_path / "sae.safetensors", "W_enc")
    handle = plugin.module("diffbias_core.sae.lazy").open_sae(tmp_path / "sae.safetensors")
    wire = plugin.module("nodes.wires").SaeWire(handle, str(tmp_path / "sae.safetensors"))
    node = plugin.node_classes["DiffBiasApplyIntervention"]
    widgets = dict(mode="balance", target="", edit="add", strength=8.0, top_k=6, start_percent=0.0,
                   end_percent=1.0, cond_only=True, seed=0)  # fmt: skip
    patched = node.execute(model, wire, features, **widgets).args[0]
    assert not handle.is_loaded, "the add edit loaded the whole SAE"
    assert_differs(first_step_predictions(patched, *conds(), tiny_latent())[0],
                   first_step_predictions(model, *conds(), tiny_latent())[0], "the add-edited cond prediction")  # fmt: skip
    with pytest.raises(core.FormatError, match=r"tensor\(s\) \['W_enc'\] does not match the recorded digest"):
        node.execute(model, wire, features, **{**widgets, "edit": "scale", "strength": 2.0})


def test_comfyui_loads_counts_unloads_and_frees_the_sae_of_an_encoder_edit(unet_setup, plugin, core):
    import comfy.model_management as mm

    model, sae, features = unet_setup
    patched = forced(plugin, core, model, sae, features, core.EditSpec(mode="scale", strength=2.0, top_k=6),
                     encoder=None)  # fmt: skip
    weights = patched.model_options["transformer_options"]["patches"]["output_block_patch"][0].fn.weights
    module = weakref.ref(weights.model)
    assert weights.model.sae is not None, "a scale edit must hold the SAE"
    first_step_predictions(patched, *conds(), tiny_latent())

    def listed(patcher=weights):
        return [m for m in mm.current_loaded_models if m.model is patcher]

    assert len(listed()) == 1, "sampling did not load the edit's weights through ComfyUI's model management"
    assert (
        listed()[0].model_memory()
        == mm.module_size(weights.model)
        >= sum(getattr(sae, n).nbytes for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    ), "ComfyUI's memory estimate does not count the SAE"
    mm.unload_all_models()
    assert listed() == [], "unload_all_models() left the edit's SAE loaded"
    del patched, weights, listed
    gc.collect()
    assert module() is None, "the edit's SAE module outlived the patched model"


def test_the_batch_layout_of_a_cfg_call(plugin):
    """The seams module maps ComfyUI's cond_or_uncond chunks to rows (what rows_for_images did in the core)."""
    patching = plugin.module("nodes.patching")
    assert patching.chosen_chunks({"cond_or_uncond": [1, 0]}, 6, True) == ([1], 2, 3)
    assert patching.chosen_chunks({"cond_or_uncond": [0, 1, 0]}, 6, True) == ([0, 2], 3, 2)
    assert patching.chosen_chunks({"cond_or_uncond": [1, 0]}, 6, False) == ([0, 1], 2, 3)
    assert patching.chosen_chunks({}, 3, True) == ([0], 1, 3), (
        "without cond_or_uncond the batch is one cond chunk"
    )
    with pytest.raises(ValueError, match=r"a batch of 5 rows does not split into 2 equal chunks"):
        patching.chosen_chunks({"cond_or_uncond": [0, 1]}, 5, True)
    image_class = torch.tensor([1, 0, -2])
    assert patching.row_classes(image_class, 2, 6).tolist() == [1, 0, -2, 1, 0, -2]
    with pytest.raises(ValueError, match=r"hold 2 rows each, but classes were assigned to 3 images"):
        patching.row_classes(image_class, 2, 4)
