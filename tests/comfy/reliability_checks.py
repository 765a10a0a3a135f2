"""Fault cases of the nodes inside a real ComfyUI process; prints one JSON object of results.

Run by tests/comfy/test_reliability.py as ``python reliability_checks.py CHECK...`` (cwd = ComfyUI, with
ComfyUI, the torchvision stub and this folder on PYTHONPATH). The plugin is loaded by ComfyUI's own loader;
a small random-weight UNet of the SD1.5 layout (make_checkpoint's config, 32 channels) samples on the CPU
through ComfyUI's own sampler, and the SAE folder is a temporary one registered with folder_paths.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import traceback
from pathlib import Path

import comfy.cli_args
import torch

comfy.cli_args.args.cpu = True

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from cancel import interrupt_when_progress_passes  # noqa: E402  (this script's folder is on sys.path)
from make_checkpoint import randomize_, sd15_unet_config  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's own nodes module)

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(2)


def small_unet(dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """ComfyUI's SD1.5 UNet with 32 base channels (bottleneck 128 wide), seeded random weights."""
    base = comfy.supported_models.SD15(sd15_unet_config(dtype, model_channels=32)).get_model({})
    randomize_(base.diffusion_model, torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


class PromptClip:
    """Text encoder for the small UNet: a seeded (1, 77, 768) conditioning per prompt text."""

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        seed = sum(map(ord, tokens)) % 2**31
        return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def load_plugin() -> dict:
    if not asyncio.run(nodes.load_custom_node(str(REPO))):
        raise RuntimeError("ComfyUI could not load the plugin")
    return {key: value for key, value in nodes.NODE_CLASS_MAPPINGS.items() if key.startswith("DiffBias")}


def plugin_module(suffix: str):
    """The plugin's module ``<plugin>.<suffix>`` as ComfyUI's loader imported it."""
    return sys.modules[f"{str(REPO).replace('.', '_x_')}.{suffix}"]


def core(*names: str) -> tuple:
    """Names from the plugin's own diffbias_core (this checkout's, as the nodes use it)."""
    module = plugin_module("diffbias_core")
    return tuple(getattr(module, name) for name in names)


def sae_wire(sae, path: str = "/nonexistent/sae.safetensors"):
    """A DIFFBIAS_SAE wire value (the plugin's SaeWire) for an SAE made in the check."""
    return plugin_module("nodes.wires").SaeWire(sae, path)


class SaeFolder:
    """A temporary folder registered as ComfyUI's ``sae`` model folder for the duration of a check."""

    def __enter__(self) -> Path:
        self._tmp = tempfile.TemporaryDirectory()
        self._saved = folder_paths.folder_names_and_paths.get("sae")
        folder_paths.folder_names_and_paths["sae"] = ([self._tmp.name], {".safetensors"})
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            folder_paths.folder_names_and_paths["sae"] = self._saved
        self._tmp.cleanup()


def train_inputs(**overrides) -> dict:
    """Train Bias SAE widgets for the small UNet (64 px: a 1x1 bottleneck, one row per image and step)."""
    inputs = dict(prompts="a photo of a person\na photo of a doctor", negative_prompt="", width=64, height=64,
                  steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", seed=0, images=48, batch_size=8,
                  hook="unet.middle", latents=64, k=4, file_name="my_sae")  # fmt: skip
    inputs.update(overrides)
    return inputs


def interrupt_at_model_call(model, call: int) -> list:
    """Make ComfyUI's interrupt flag go up at the ``call``-th model call of ``model`` (a real user cancel)."""
    calls: list[int] = []

    def cancel_later(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            comfy.model_management.interrupt_current_processing(True)
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_cancel", cancel_later)
    return calls


def run_interrupted(fn) -> bool:
    """Run ``fn``; True when it ended with ComfyUI's InterruptProcessingException. Clears the flag after."""
    try:
        fn()
    except comfy.model_management.InterruptProcessingException:
        return True
    finally:
        comfy.model_management.interrupt_current_processing(False)
    return False


# ------------------------------------------------------------------------------------------------ case 1
def check_cancel_keeps_existing(mapping) -> dict:
    """Cancel Train Bias SAE late in a run whose file name is taken: the old SAE and its features survive."""
    FeatureSet, SparseAutoencoder, load_sae, save_features, save_sae = core(
        "FeatureSet", "SparseAutoencoder", "load_sae", "save_features", "save_sae"
    )

    out = {}
    with SaeFolder() as folder:
        old = SparseAutoencoder(128, 512, 8, hook="unet.middle", model_family="sd15")
        old.reset_parameters(torch.Generator().manual_seed(3))
        save_sae(old, folder / "my_sae.safetensors")
        ids = torch.arange(5, dtype=torch.int64)
        scores = torch.linspace(1, 0, 5)
        features = FeatureSet(
            ("a", "b"), (ids, ids + 5), (scores, scores), old.fingerprint(), "unet.middle", "ig"
        )
        save_features(features, folder / "my_sae.gender.features.safetensors")
        before = (folder / "my_sae.safetensors").read_bytes()
        model = small_unet()
        calls = interrupt_at_model_call(model, 4 * 4 + 2)  # in the 5th of 6 runs (one model call per step)
        out["sampling_interrupted"] = run_interrupted(
            lambda: mapping["DiffBiasTrainSAE"].execute(model, PromptClip(), **train_inputs())
        )
        out["sampling_model_calls"] = len(calls)
        out["sampling_unchanged"] = (folder / "my_sae.safetensors").read_bytes() == before
        out["sampling_files"] = sorted(p.name for p in folder.iterdir())
        inputs = train_inputs()
        sampling_units = inputs["images"] // inputs["batch_size"] * inputs["steps"]
        with interrupt_when_progress_passes(sampling_units):  # Cancel once training has begun
            out["interrupted"] = run_interrupted(
                lambda: mapping["DiffBiasTrainSAE"].execute(small_unet(), PromptClip(), **inputs)
            )
        out["existing_unchanged"] = (folder / "my_sae.safetensors").read_bytes() == before
        out["features_still_match"] = True
        try:
            (load_features,) = core("load_features")

            load_features(folder / "my_sae.gender.features.safetensors").check_matches(
                load_sae(folder / "my_sae.safetensors")
            )
        except ValueError:
            out["features_still_match"] = False
        partial = folder / "my_sae.cancelled.safetensors"
        out["partial_written"] = partial.is_file()
        if partial.is_file():
            out["partial_steps"] = int(load_sae(partial).provenance["steps"])
        out["files"] = sorted(p.name for p in folder.iterdir())
    return out


# ------------------------------------------------------------------------------------------------ case 2
def count_model_calls(model) -> list:
    calls: list[int] = []

    def counting(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_count", counting)
    return calls


def attribute_inputs(**overrides) -> dict:
    """Attribute Bias Features widgets for the small UNet (64 px: a 1x1 bottleneck)."""
    inputs = dict(class_prompts="a photo of a male person\na photo of a female person", negative_prompt="",
                  width=64, height=64, samples=4, batch_size=4, steps=3, cfg=5.0, sampler_name="euler",
                  scheduler="normal", seed=0, method="integrated gradients", top_k=5)  # fmt: skip
    inputs.update(overrides)
    return inputs


def error_of(fn) -> str:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the check reports whatever the node raised
        return f"{type(error).__name__}: {error}"
    return ""


def check_late_failures_first(mapping) -> dict:
    """A file name too long for its temporary form, and a kernel-2 SAE at a size whose bottleneck is 1x1:
    both refused before the first model call."""
    out = {}
    with SaeFolder():
        model = small_unet()
        calls = count_model_calls(model)
        name = "n" * 236  # 'n...n.safetensors' is 248 bytes: a valid name, its temporary form is not
        out["long_name_error"] = error_of(
            lambda: mapping["DiffBiasTrainSAE"].execute(
                model, PromptClip(), **train_inputs(images=2, batch_size=2, file_name=name)
            )
        )
        out["long_name_model_calls"] = len(calls)
        (SparseAutoencoder,) = core("SparseAutoencoder")

        sae = SparseAutoencoder(128, 64, 4, kernel_size=2, hook="unet.middle", model_family="sd15")
        out["kernel_error"] = error_of(
            lambda: mapping["DiffBiasAttributeFeatures"].execute(
                model, PromptClip(), sae_wire(sae), **attribute_inputs()
            )
        )
        out["kernel_model_calls"] = len(calls)
    return out


# ------------------------------------------------------------------------------------------------ case 6
def check_train_name_in_feature_namespace(mapping) -> dict:
    """Train Bias SAE named like a feature set: refused before sampling, the feature set unchanged."""
    out = {}
    with SaeFolder() as folder:
        existing = folder / "bias.features.safetensors"
        existing.write_bytes(b"a feature set")
        model = small_unet()
        calls = count_model_calls(model)
        for name in ("bias.features", "bias.features.safetensors", "bias.FEATURES"):
            out[name] = error_of(
                lambda name=name: mapping["DiffBiasTrainSAE"].execute(
                    model, PromptClip(), **train_inputs(images=2, batch_size=2, file_name=name)
                )
            )
        out["model_calls"] = len(calls)
        out["unchanged"] = existing.read_bytes() == b"a feature set"
    return out


# ------------------------------------------------------------------------------------------------ case 12
def check_listing_survives_bad_files(mapping) -> dict:
    """A layout folder whose sae.safetensors header is deeply nested JSON, next to a good SAE: the Load SAE
    schema (what /object_info sends) still lists both; loading the bad one names it."""
    SparseAutoencoder, save_sae = core("SparseAutoencoder", "save_sae")

    out = {}
    with SaeFolder() as folder:
        save_sae(SparseAutoencoder(8, 16, 2), folder / "good.safetensors")
        bad = folder / "crafted"
        bad.mkdir()
        raw = ("[" * 200_000 + "]" * 200_000).encode()
        (bad / "sae.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
        (bad / "cfg.json").write_text("{}")
        load = mapping["DiffBiasLoadSAE"]
        try:
            schema = load.INPUT_TYPES()
            kind, options = schema["required"]["sae_name"][:2]
            out["choices"] = list(options["options"] if kind == "COMBO" else kind)
        except Exception as error:  # noqa: BLE001 - the check reports what /object_info would have hit
            out["schema_error"] = f"{type(error).__name__}: {error}"
        out["load_error"] = error_of(lambda: load.execute(sae_name="crafted/"))
    return out


# ------------------------------------------------------------------------------------------------ case 13
def check_hook_override_bounds(mapping) -> dict:
    """Load Bias SAE with a 5000-digit block number or one beyond any model's blocks: a hook-point error."""
    SparseAutoencoder, save_sae = core("SparseAutoencoder", "save_sae")

    out = {}
    with SaeFolder() as folder:
        save_sae(SparseAutoencoder(8, 16, 2), folder / "good.safetensors")
        load = mapping["DiffBiasLoadSAE"]
        for name, override in (("digits", "unet.output." + "9" * 5000), ("beyond", "dit.double.1000")):
            out[name] = error_of(
                lambda override=override: load.execute(sae_name="good.safetensors", hook_override=override)
            )
        out["fine"] = error_of(
            lambda: load.execute(sae_name="good.safetensors", hook_override="dit.double.18")
        )
    return out


# ------------------------------------------------------------------------------------------------ case 8
PROMPT_SYNTAX = {
    "weights": "a photo of a (male:1.2) person\na photo of a (female:1.2) person",
    "style_prefix": "style: watercolor, a male person\nstyle: watercolor, a female person",
    "embedding": "embedding:easynegative a male person\nembedding:easynegative a female person",
    "embedding_only": "embedding:male\nembedding:female",
    "named_with_weights": "male: a photo of a (man:1.1)\nfemale: a photo of a (woman:1.1)",
    "weighted_shared_word": "a (photo:0.9) of a man, (sharp:1.3)\na (photo:0.9) of a woman, (sharp:1.3)",
    "escaped": "a photo of a \\(male\\) person\na photo of a \\(female\\) person",
}


def check_prompt_syntax(mapping) -> dict:
    """Class names and the prompts handed to the text encoder, for CLIP Text Encode's prompt syntaxes."""
    class_prompts = plugin_module("nodes.sampling").class_prompts
    out = {}
    for name, text in PROMPT_SYNTAX.items():
        try:
            names, prompts = class_prompts(text)
            out[name] = {"names": list(names), "prompts": list(prompts)}
        except ValueError as error:
            out[name] = {"error": str(error)}
    return out


# ------------------------------------------------------------------------------------------------ case 10
def check_apply_top_k_above_features(mapping) -> dict:
    """Apply Feature Intervention with top_k above a class's feature count: an error, not a silent clamp."""
    FeatureSet, SparseAutoencoder = core("FeatureSet", "SparseAutoencoder")

    sae = SparseAutoencoder(128, 64, 4, hook="unet.middle", model_family="sd15")
    features = FeatureSet(("male", "female"), (torch.arange(6), torch.arange(6, 10)),
                          (torch.linspace(1, 0, 6), torch.linspace(1, 0, 4)), sae.fingerprint(), sae.hook, "ig")  # fmt: skip
    widgets = dict(mode="balance", target="", edit="add", strength=10.0, start_percent=0.0, end_percent=1.0,
                   cond_only=True, seed=0)  # fmt: skip
    apply = mapping["DiffBiasApplyIntervention"]
    model = small_unet()
    return {
        "above": error_of(lambda: apply.execute(model, sae_wire(sae), features, top_k=5, **widgets)),
        "equal": error_of(lambda: apply.execute(model, sae_wire(sae), features, top_k=4, **widgets)),
    }


# ------------------------------------------------------------------------------------------------ case 14
def check_attribute_cancel_after_sampling(mapping) -> dict:
    """Cancel pressed when Attribute's sampling has ended (probe fitting starts) or when its probes are
    fitted (integrated gradients start): the node stops there with ComfyUI's interrupt."""
    (SparseAutoencoder,) = core("SparseAutoencoder")
    sae = SparseAutoencoder(128, 64, 4, hook="unet.middle", model_family="sd15")
    inputs = attribute_inputs()
    sampled = 2 * inputs["steps"]  # two classes, one run each (samples == batch_size)
    out = {}
    for name, at in (("probes", sampled), ("ig", sampled + inputs["steps"])):
        seen = []

        def hook(value, total, preview, node_id=None, at=at, seen=seen):
            seen.append(value)
            if value >= at:
                comfy.model_management.interrupt_current_processing(True)

        comfy.utils.set_progress_bar_global_hook(hook)
        try:
            model = small_unet()
            out[name] = run_interrupted(
                lambda model=model: mapping["DiffBiasAttributeFeatures"].execute(
                    model, PromptClip(), sae_wire(sae), **inputs
                )
            )
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        out[f"{name}_last_progress"] = max(seen, default=0)
        out[f"{name}_total"] = sampled + 2 * inputs["steps"]
    out["left_in_temp"] = sorted(p.name for p in Path(folder_paths.get_temp_directory()).glob("diffbias-*"))
    return out


# ------------------------------------------------------------------------------------------------ case 15
class TempFolder:
    """A temporary folder set as ComfyUI's temp directory for the duration of a check."""

    def __enter__(self) -> Path:
        self._tmp = tempfile.TemporaryDirectory()
        self._saved = folder_paths.get_temp_directory()
        folder_paths.set_temp_directory(self._tmp.name)
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        folder_paths.set_temp_directory(self._saved)
        self._tmp.cleanup()


def check_attribute_memory(mapping) -> dict:
    """Attribute says what its run needs (RAM at its peak, temporary disk) and refuses before the first model
    call what the machine cannot hold (here: a machine reporting 4 KiB of memory, then 4 KiB of free disk);
    its spooled activations are gone from ComfyUI's temp folder after a run, a refusal, an error and a cancel."""
    (SparseAutoencoder,) = core("SparseAutoencoder")
    memory = plugin_module("diffbias_core.base.memory")
    budget = plugin_module("diffbias_core.attribute.budget")
    AttributionConfig = plugin_module("diffbias_core.attribute.attribution").AttributionConfig
    ProbeConfig = plugin_module("diffbias_core.attribute.probes").ProbeConfig
    sae = SparseAutoencoder(128, 64, 4, hook="unet.middle", model_family="sd15")
    attribute = mapping["DiffBiasAttributeFeatures"]
    need = budget.attribution_memory(sae, (128, 1, 1), images=8, steps=3, classes=2, attribution=AttributionConfig(top_k=5),
                                     probes=ProbeConfig(), recorded_itemsize=4)  # fmt: skip
    out = {"expected": need.describe(), "disk": need.disk}
    with TempFolder() as temp:
        model = small_unet()
        calls = count_model_calls(model)
        seen = []

        def watch(value, total, preview, node_id=None):  # while sampling: what the spool holds
            seen.append(sum(f.stat().st_size for f in temp.rglob("*.safetensors")))

        comfy.utils.set_progress_bar_global_hook(watch)
        try:
            outputs = attribute.execute(model, PromptClip(), sae_wire(sae), **attribute_inputs()).result
            out["text"] = outputs[2]
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        out["spooled_bytes"] = max(seen, default=0)
        out["left_after_run"] = sorted(p.name for p in temp.iterdir())
        for name, patch in (("refused_ram", "available_memory"), ("refused_disk", "free_disk")):
            calls.clear()
            real = getattr(memory, patch)
            setattr(memory, patch, lambda *args: 4096)
            try:
                out[name] = error_of(
                    lambda: attribute.execute(model, PromptClip(), sae_wire(sae), **attribute_inputs())
                )
            finally:
                setattr(memory, patch, real)
            out[f"{name}_model_calls"] = len(calls)
        out["left_after_refusals"] = sorted(p.name for p in temp.iterdir())
        node = plugin_module("nodes.attribute")
        real_attribute = node.attribute

        def failing(*args, **kwargs):  # an error after sampling, while the spool holds every activation
            out["spooled_at_error"] = [p.name for p in temp.iterdir()]
            raise RuntimeError("planted failure")

        node.attribute = failing
        try:
            out["error"] = error_of(
                lambda: attribute.execute(model, PromptClip(), sae_wire(sae), **attribute_inputs())
            )
        finally:
            node.attribute = real_attribute

        def hook(value, total, preview, node_id=None):
            return value >= 4 and comfy.model_management.interrupt_current_processing(True)

        comfy.utils.set_progress_bar_global_hook(hook)
        try:
            out["cancelled"] = run_interrupted(
                lambda: attribute.execute(model, PromptClip(), sae_wire(sae), **attribute_inputs())
            )
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        out["left_after_error_and_cancel"] = sorted(p.name for p in temp.iterdir())
    return out


CHECKS = {
    "attribute_memory": check_attribute_memory,
    "attribute_cancel_after_sampling": check_attribute_cancel_after_sampling,
    "apply_top_k_above_features": check_apply_top_k_above_features,
    "prompt_syntax": check_prompt_syntax,
    "hook_override_bounds": check_hook_override_bounds,
    "listing_survives_bad_files": check_listing_survives_bad_files,
    "train_name_in_feature_namespace": check_train_name_in_feature_namespace,
    "cancel_keeps_existing": check_cancel_keeps_existing,
    "late_failures_first": check_late_failures_first,
}


def main() -> None:
    temp = tempfile.TemporaryDirectory()  # ComfyUI's own temp folder may be read-only (CI)
    folder_paths.set_temp_directory(temp.name)
    mapping = load_plugin()
    results = {}
    for name in sys.argv[1:] or list(CHECKS):
        try:
            results[name] = CHECKS[name](mapping)
        except Exception:  # noqa: BLE001 - one broken check must not hide the others' results
            results[name] = {"check_failed": traceback.format_exc()}
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
