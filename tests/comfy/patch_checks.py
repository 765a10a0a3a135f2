"""Patch-level checks inside a real ComfyUI process; prints one JSON object of results.

Run by tests/comfy/test_patches.py as ``python patch_checks.py`` with ComfyUI, the torchvision stub and
this repository on PYTHONPATH (cwd = ComfyUI). Tiny random-weight models (an SD1.5-layout UNet with
few channels, a two-block Flux) sample on the CPU through ComfyUI's own sampler; the plugin is loaded by
ComfyUI's own loader.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import comfy.cli_args
import torch

comfy.cli_args.args.cpu = True

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402
from make_checkpoint import randomize_  # noqa: E402  (this script's folder is on sys.path)

import nodes  # noqa: E402  (ComfyUI's own nodes module)
from diffbias_core import EditSpec, FeatureSet, SparseAutoencoder  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(2)


def randomize_seeded(module: torch.nn.Module, seed: int) -> None:
    """make_checkpoint's seeded random weights from a seed."""
    randomize_(module, torch.Generator().manual_seed(seed))


def patcher(base) -> comfy.model_patcher.ModelPatcher:
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def tiny_unet():
    config = {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": 768,
        "num_heads": 2,
        "transformer_depth_output": [1, 1, 1, 1],
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "dtype": torch.float32,
    }
    base = comfy.supported_models.SD15(config).get_model({})
    randomize_seeded(base.diffusion_model, 0)
    return patcher(base)


def tiny_flux():
    config = {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "vec_in_dim": 32,
        "context_in_dim": 48,
        "hidden_size": 64,
        "mlp_ratio": 2.0,
        "num_heads": 2,
        "depth": 2,
        "depth_single_blocks": 2,
        "axes_dim": [8, 12, 12],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": False,
        "dtype": torch.float32,
    }
    base = comfy.supported_models.Flux(config).get_model({})
    randomize_seeded(base.diffusion_model, 1)
    return patcher(base)


def make_sae(width: int, hook: str, family: str, seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(width, 96, 8, hook=hook, model_family=family)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def make_features(sae: SparseAutoencoder, classes=("male", "female")) -> FeatureSet:
    ids = torch.randperm(sae.num_latents, generator=torch.Generator().manual_seed(3))[: 6 * len(classes)]
    return FeatureSet(
        classes=tuple(classes),
        ids=tuple(ids.reshape(len(classes), 6).clone()),
        scores=tuple(torch.linspace(1, 0.5, 6) for _ in classes),
        sae_fingerprint=sae.fingerprint(),
        hook=sae.hook,
        method="random",
    )


def load_plugin():
    ok = asyncio.run(nodes.load_custom_node(str(REPO)))
    if not ok:
        raise RuntimeError("ComfyUI's loader did not load the plugin")
    package = sys.modules[str(REPO).replace(".", "_x_")]
    return nodes.NODE_CLASS_MAPPINGS, sys.modules[package.__name__ + ".nodes.patching"]


def conds(batch_tokens: int = 77, dim: int = 768, seed: int = 5, pooled: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, pooled, generator=generator)} if pooled else {}
    positive = [[torch.randn(1, batch_tokens, dim, generator=generator), dict(extra)]]
    negative = [[torch.randn(1, batch_tokens, dim, generator=generator), dict(extra)]]
    return positive, negative


def sample(model, positive, negative, batch=2, size=32, steps=2, cfg=5.0, seed=7, channels=4):
    latent = torch.zeros(batch, channels, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=seed
    )


def apply_node(mapping, model, sae, features, **overrides):
    wire = sys.modules[mapping["DiffBiasLoadSAE"].__module__.rsplit(".", 1)[0] + ".wires"].SaeWire
    args = dict(
        mode="balance",
        target="",
        edit="add",
        strength=8.0,
        top_k=6,
        start_percent=0.0,
        end_percent=1.0,
        cond_only=True,
        seed=0,
    )
    args.update(overrides)
    return (
        mapping["DiffBiasApplyIntervention"].execute(model, wire(sae, "/dev/null"), features, **args).args[0]
    )


def first_step_predictions(model, positive, negative, batch=2):
    """cond and uncond denoised predictions of the first sampler step (same input for every model)."""
    seen = {}

    def post_cfg(args):
        seen.setdefault("cond", args["cond_denoised"].clone())
        seen.setdefault("uncond", args["uncond_denoised"].clone())
        return args["denoised"]

    clone = model.clone()
    clone.set_model_sampler_post_cfg_function(post_cfg)
    sample(clone, positive, negative, batch=batch, steps=1)
    return seen["cond"], seen["uncond"]


def unet_checks(mapping, patching) -> dict:
    out = {}
    model = tiny_unet()
    sae = make_sae(64, "unet.middle", "sd15")
    features = make_features(sae)
    positive, negative = conds()

    before = sample(model, positive, negative)
    patched = apply_node(mapping, model, sae, features)
    edited = sample(patched, positive, negative)
    after = sample(model, positive, negative)
    out["patched_image_differs"] = bool((edited != before).any())
    out["unpatched_same_before_and_after"] = bool(torch.equal(before, after))

    cond_plain, uncond_plain = first_step_predictions(model, positive, negative)
    cond_edit, uncond_edit = first_step_predictions(patched, positive, negative)
    out["cond_only_uncond_identical"] = bool(torch.equal(uncond_plain, uncond_edit))
    out["cond_only_cond_changed"] = bool((cond_plain != cond_edit).any())
    both = apply_node(mapping, model, sae, features, cond_only=False)
    out["cond_and_uncond_uncond_changed"] = bool(
        (first_step_predictions(both, positive, negative)[1] != uncond_plain).any()
    )

    neutral = apply_node(mapping, model, sae, features, strength=0.0)
    out["neutral_node_returns_input"] = neutral is model
    out["neutral_image_identical"] = bool(torch.equal(sample(neutral, positive, negative), before))
    model_info = sys.modules[patching.__name__.rsplit(".", 1)[0] + ".model_info"]
    forced = patching.add_intervention(  # installed although neutral: apply_edit must be the identity
        model,
        model_info.parse_hook("unet.middle"),
        sae,
        features,
        EditSpec(mode="scale", strength=1.0, top_k=6),
        weights=(1.0, 1.0),
        fixed=None,
        seed=0,
        window=(0.0, 1.0),
        cond_only=False,
    )
    out["neutral_patch_image_identical"] = bool(torch.equal(sample(forced, positive, negative), before))
    window = apply_node(mapping, model, sae, features, start_percent=0.999, end_percent=1.0)
    out["outside_window_identical"] = bool(
        torch.equal(sample(window, positive, negative, steps=1), sample(model, positive, negative, steps=1))
    )

    # clone() shares the patch object and the SAE weights; the input model has no patch
    clone = patched.clone()
    patch_list = patched.model_options["transformer_options"]["patches"]["output_block_patch"]
    clone_list = clone.model_options["transformer_options"]["patches"]["output_block_patch"]
    out["clone_shares_patch"] = patch_list[0] is clone_list[0]
    out["clone_shares_sae_weights"] = clone_list[0].fn.sae.W_dec.data_ptr() == sae.W_dec.data_ptr()
    out["input_model_unpatched"] = "patches" not in model.model_options["transformer_options"]
    edit = patch_list[0].fn
    out["to_returns_self"] = edit.to(torch.device("cpu")) is edit and edit.to(torch.float16) is edit
    h = torch.randn(2, 64, 1, 1)
    edited_h = edit(h, {"cond_or_uncond": [0], "sigmas": torch.ones(2)})
    out["compute_dtype_follows_to"] = edit._work[1] == torch.float16 and edited_h.dtype == torch.float32
    edit.to(torch.float32)

    out.update(assignment_checks(mapping, patching, model, sae, features, positive, negative))
    return out


def assignment_checks(mapping, patching, model, sae, features, positive, negative) -> dict:
    out = {}

    def classes_seen(patched, seed, batch=8):
        seen = {}

        def post_cfg(args):
            options = args["model_options"]["transformer_options"]
            for key, value in options.items():
                if key.startswith(patching.INTERVENTION_KEY) and isinstance(value, patching.RunState):
                    seen.setdefault(key, value.image_class.tolist())
            return args["denoised"]

        clone = patched.clone()
        clone.set_model_sampler_post_cfg_function(post_cfg)
        sample(clone, positive, negative, batch=batch, steps=1, seed=seed)
        return seen

    patched = apply_node(mapping, model, sae, features)
    first = classes_seen(patched, 11)
    again = classes_seen(patched, 11)
    others = [classes_seen(patched, seed) for seed in (12, 13, 14)]
    labels = next(iter(first.values()))
    out["batch8_counts"] = [labels.count(0), labels.count(1)]
    out["assignment_reproducible"] = first == again
    out["assignment_changes_with_seed"] = any(o != first for o in others)

    race = make_features(sae, ("white", "black", "asian", "indian"))
    stacked = apply_node(mapping, apply_node(mapping, model, sae, features), sae, race, seed=0)
    seen = classes_seen(stacked, 11)
    out["stacked_keys"] = sorted(seen)
    out["stacked_race_counts"] = [seen[sorted(seen)[1]].count(c) for c in range(4)]
    return out


def flux_checks(mapping, patching) -> dict:
    out = {}
    model = tiny_flux()
    sae = make_sae(64, "dit.double.0", "flux", seed=2)
    positive, negative = conds(batch_tokens=5, dim=48, pooled=32)

    for stage, index, observe in (("double", 0, ("double_block", 1)), ("single", 0, ("single_block", 1))):
        sae.hook = f"dit.{stage}.{index}"
        features = make_features(sae)
        seen = {}

        def observer(args, extra, seen=seen):
            seen.setdefault("img", args["img"].clone())
            if "txt" in args:
                seen.setdefault("txt", args["txt"].clone())
            return extra["original_block"](args)

        runs = {}
        for name, base in (("plain", model), ("edited", apply_node(mapping, model, sae, features))):
            seen.clear()
            watched = base.clone()
            watched.set_model_patch_replace(observer, "dit", observe[0], observe[1])
            sample(watched, positive, negative, batch=2, size=32, steps=1, cfg=1.0, channels=16)
            runs[name] = dict(seen)
        txt_len = positive[0][0].shape[1]
        if stage == "double":
            out["double_txt_identical"] = bool(torch.equal(runs["plain"]["txt"], runs["edited"]["txt"]))
            out["double_img_changed"] = bool((runs["plain"]["img"] != runs["edited"]["img"]).any())
        else:
            plain, edited = runs["plain"]["img"], runs["edited"]["img"]
            out["single_txt_identical"] = bool(torch.equal(plain[:, :txt_len], edited[:, :txt_len]))
            out["single_img_changed_everywhere"] = bool(
                (plain[:, txt_len:] != edited[:, txt_len:]).any(-1).all()
            )
    return out


class FakeClip:
    """Text encoder stand-in for the tiny UNet: a seeded random (1, 77, 768) conditioning per prompt."""

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        seed = sum(map(ord, tokens)) % 2**31
        return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def interrupt_checks(mapping, tmp: Path) -> dict:
    """Cancel Train Bias SAE during its third sampler run: the file holds the best weights so far."""
    import comfy.patcher_extension
    import folder_paths

    from diffbias_core import load_sae

    calls = []

    def cancel_later(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # runs of 4 steps: the 9th model call is in the third run
            comfy.model_management.interrupt_current_processing(True)
        return executor(*args, **kwargs)

    model = tiny_unet()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_cancel", cancel_later)
    saved = folder_paths.folder_names_and_paths["sae"]
    folder_paths.folder_names_and_paths["sae"] = ([str(tmp)], {".safetensors"})
    out = {"interrupt_raised": False}
    try:
        mapping["DiffBiasTrainSAE"].execute(
            model,
            FakeClip(),
            "a photo of a person\na photo of a doctor",
            "",
            32,
            32,
            4,
            5.0,
            "euler",
            "normal",
            0,
            16,
            4,
            "unet.middle",
            64,
            4,
            "cancelled",
        )
    except comfy.model_management.InterruptProcessingException:
        out["interrupt_raised"] = True
    finally:
        comfy.model_management.interrupt_current_processing(False)
        folder_paths.folder_names_and_paths["sae"] = saved
    path = tmp / "cancelled.safetensors"
    out["interrupt_file_written"] = path.is_file()
    if path.is_file():
        sae = load_sae(path)
        out["interrupt_file_sae"] = [sae.d_in, sae.num_latents, sae.k, sae.hook, sae.model_family]
        out["interrupt_file_steps"] = int(sae.provenance.get("steps", "0"))
    out["interrupt_model_calls"] = len(calls)
    return out


def folder_checks(mapping) -> dict:
    """A missing models/sae folder: validation and execution say where to create it."""
    import folder_paths

    saved = folder_paths.folder_names_and_paths["sae"]
    folder_paths.folder_names_and_paths["sae"] = (["/nonexistent/diffbias/models/sae"], {".safetensors"})
    load = mapping["DiffBiasLoadSAE"]
    try:
        validation = load.validate_inputs(sae_name="x.safetensors")
        try:
            load.execute(sae_name="x.safetensors")
            raised = ""
        except FileNotFoundError as error:
            raised = str(error)
    finally:
        folder_paths.folder_names_and_paths["sae"] = saved
    return {"missing_folder_validation": validation, "missing_folder_error": raised}


def main() -> None:
    mapping, patching = load_plugin()
    results = folder_checks(mapping)
    with tempfile.TemporaryDirectory() as tmp:
        results.update(interrupt_checks(mapping, Path(tmp)))
    results.update(unet_checks(mapping, patching))
    results.update(flux_checks(mapping, patching))
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
