"""ComfyUI side of the benchmarks: a real ComfyUI process, its own UNet classes, the plugin's nodes.

Everything the product does is reached through its node-level seams, as a workflow reaches it: SAE files
are written to a folder registered as ComfyUI's ``sae`` models folder and read by Load Bias SAE
(``DiffBiasLoadSAE``); models are patched by Apply Feature Intervention (``DiffBiasApplyIntervention``); the
attribution is the Attribute Bias Features node (``DiffBiasAttributeFeatures``). A change of how those
nodes work inside is measured without a change here.

Import this module only inside a process started by :func:`reexec_with_comfyui` (ComfyUI importable).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
CHILD_FLAG = "DIFFBIAS_BENCH_CHILD"


def reexec_with_comfyui() -> None:
    """Start this script again with ComfyUI importable (COMFYUI_PATH on PYTHONPATH), unless it already is."""
    if os.environ.get(CHILD_FLAG):
        return
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui or not (Path(comfyui) / "comfy").is_dir():
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (the folder holding main.py)")
    parts = [comfyui, str(REPO), str(REPO / "benchmarks")]
    if importlib.util.find_spec("torchvision") is None:
        parts.insert(0, str(REPO / "tests" / "comfy" / "stubs"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(parts + [os.environ.get("PYTHONPATH", "")]))
    env[CHILD_FLAG] = "1"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


class Plugin(NamedTuple):
    """The plugin as ComfyUI's loader imported it."""

    nodes: dict
    """Node id -> node class (``DiffBias*`` only)."""
    core: object
    """The plugin's own ``diffbias_core`` package (the classes its nodes check against)."""


def start(device: str, threads: int = 0) -> Plugin:
    """Import ComfyUI for ``device`` ("cpu" or "cuda") and load the plugin with ComfyUI's own loader."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    import torch

    import nodes as comfy_nodes

    if threads:
        torch.set_num_threads(threads)
    if not asyncio.run(comfy_nodes.load_custom_node(str(REPO))):
        sys.exit("ComfyUI's loader could not load the plugin")
    mapping = {key: cls for key, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items() if key.startswith("DiffBias")}
    return Plugin(mapping, sys.modules[str(REPO).replace(".", "_x_") + ".diffbias_core"])


def _make_checkpoint_tools():
    """tests/comfy/make_checkpoint.py, the one home of the SD1.5 UNet config and the seeded random weights."""
    spec = importlib.util.spec_from_file_location(
        "diffbias_make_checkpoint", REPO / "tests/comfy/make_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}  # fmt: skip
"""ComfyUI's SDXL base UNet config (what ``comfy.model_detection`` finds in an SDXL checkpoint)."""


class UNetSize(NamedTuple):
    """One benchmarked model size."""

    family: str
    """``sd15`` or ``sdxl`` (the SAE files record it)."""
    pixels: int
    """Image side in pixels."""
    context: int
    """Text-conditioning width (CLIP-L 768, SDXL 2048)."""
    middle: int
    """Side of the UNet bottleneck map at ``pixels`` (latent side / 8)."""


SIZES = {"sd15": UNetSize("sd15", 512, 768, 8), "sdxl": UNetSize("sdxl", 1024, 2048, 32)}
SMALL_WIDTH = 64
"""Base channels of the ``--quick`` UNets (the real block layout, a fraction of the width and attention)."""


def build_unet(size: UNetSize, dtype, device: str, quick: bool, channels: int | None = None):
    """ComfyUI's own SD1.5 or SDXL UNet with seeded random weights, in a ModelPatcher for ``device``.

    ``channels``: base width (default 320, the real one; :data:`SMALL_WIDTH` when ``quick``)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    tools = _make_checkpoint_tools()
    channels = channels or (SMALL_WIDTH if quick else 320)
    if size.family == "sd15":
        config = tools.sd15_unet_config(dtype, model_channels=channels)
        model_class = comfy.supported_models.SD15
        if quick:  # no attention at the 64x64 level, one head: 4096 x 4096 maps would dominate a small UNet
            config.update(num_heads=1, transformer_depth=[0, 0, 1, 1, 1, 1, 0, 0],
                          transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0])  # fmt: skip
    else:
        config = dict(SDXL_UNET, dtype=dtype, model_channels=channels)
        if quick:  # attention only at the 32x32 level, one block each: the layout stays, the cost drops
            config.update(transformer_depth=[0, 0, 0, 0, 1, 1], transformer_depth_middle=1,
                          transformer_depth_output=[0, 0, 0, 0, 0, 0, 1, 1, 1])  # fmt: skip
        model_class = comfy.supported_models.SDXL
    model_config = model_class(config)
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model({})
    tools.randomize_(base.diffusion_model, torch.Generator().manual_seed(0))
    load = torch.device(device)
    offload = comfy.model_management.unet_offload_device() if device != "cpu" else load
    return comfy.model_patcher.ModelPatcher(base, load_device=load, offload_device=offload)


def conditioning(size: UNetSize) -> tuple[list, list]:
    """Seeded (1, 77, context) positive and negative conditioning (SDXL: with the pooled output)."""
    import torch

    generator = torch.Generator().manual_seed(2)

    def one() -> list:
        extras = {"pooled_output": torch.randn(1, 1280, generator=generator)} if size.family == "sdxl" else {}
        return [[torch.randn(1, 77, size.context, generator=generator), extras]]

    return one(), one()


class Layout(NamedTuple):
    """An SAE layout at the UNet bottleneck ``unet.middle``."""

    name: str
    """``per_token`` or ``kernel8``."""
    kernel: int
    """Kernel side (1 per token; 8 codes the whole 8x8 SD1.5 bottleneck as one vector)."""
    latents: int
    """Dictionary size."""
    k: int
    """Active latents per code."""


LAYOUTS = {"per_token": Layout("per_token", 1, 5120, 32), "kernel8": Layout("kernel8", 8, 5120, 1024)}


def sae_file(
    plugin: Plugin, folder: Path, size: UNetSize, layout: Layout, width: int, dtype
) -> tuple[str, str]:
    """Write (once) a seeded random native SAE file for ``layout`` at ``size``'s bottleneck into ``folder``.

    Returns (file name, decoder fingerprint); the fingerprint is remembered in a side file so that a later
    run neither rebuilds nor re-reads the weights.
    """
    import torch

    name = f"bench_{size.family}_{layout.name}_w{width}_{str(dtype).removeprefix('torch.')}.safetensors"
    path, known = folder / name, folder / (name + ".fingerprint")
    if path.is_file() and known.is_file():
        return name, known.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    sae = plugin.core.SparseAutoencoder(
        width, layout.latents, layout.k, kernel_size=layout.kernel, hook="unet.middle",
        model_family=size.family, dtype=dtype, device="meta",
    ).to_empty(device="cpu")  # fmt: skip
    sae.reset_parameters(torch.Generator().manual_seed(layout.kernel))  # one float32 draw, cast into dtype
    fingerprint = sae.fingerprint()
    plugin.core.save_sae(sae, path)
    known.write_text(fingerprint)
    return name, fingerprint


def register_sae_folder(folder: Path) -> None:
    """Make ``folder`` one of ComfyUI's ``sae`` model folders (where Load Bias SAE looks)."""
    import folder_paths

    folder_paths.add_model_folder_path("sae", str(folder), is_default=True)


def load_sae_node(plugin: Plugin, name: str):
    """The DIFFBIAS_SAE value of Load Bias SAE for file ``name`` (first output)."""
    return plugin.nodes["DiffBiasLoadSAE"].execute(sae_name=name).result[0]


def random_features(plugin: Plugin, fingerprint: str, latents: int, top_k: int = 10):
    """A FeatureSet of two classes, ``top_k`` seeded random latents each, tied to the SAE ``fingerprint``."""
    import torch

    ids = torch.randperm(latents, generator=torch.Generator().manual_seed(1))[: 2 * top_k].reshape(2, top_k)
    return plugin.core.FeatureSet(
        classes=("male", "female"),
        ids=(ids[0].clone(), ids[1].clone()),
        scores=(torch.linspace(1, 0.1, top_k), torch.linspace(1, 0.1, top_k)),
        sae_fingerprint=fingerprint,
        hook="unet.middle",
        method="random",
    )


EDIT_STRENGTH = {"add": 10.0, "scale": 2.0}


def apply_node(plugin: Plugin, model, sae, features, edit: str):
    """Apply Feature Intervention's MODEL output: balance two classes, 10 features each, cond only."""
    node = plugin.nodes["DiffBiasApplyIntervention"]
    return node.execute(
        model=model, sae=sae, features=features, mode="balance", target="", edit=edit,
        strength=EDIT_STRENGTH[edit], top_k=10, start_percent=0.0, end_percent=1.0, cond_only=True, seed=0,
    ).result[0]  # fmt: skip


class CallTimes(NamedTuple):
    """Per model call (one sampler step) of one timed model."""

    wall: list
    """Wall-clock seconds of the whole diffusion-model call."""
    cpu: list
    """Process CPU seconds of the call (CPU only; meaningless on a GPU)."""
    hooks: list
    """Seconds spent inside the output-block patches of the call (the plugin's hook at unet.middle)."""


def timed(model, device: str) -> tuple[object, CallTimes]:
    """A clone of ``model`` that records :class:`CallTimes` of every model call.

    The hook time is read by two ComfyUI ``output_block_patch`` entries put first and last in the clone's
    list, so the plugin's own patches sit between them, whatever they are. On CUDA they record events (no
    synchronisation inside the step); the call itself is synchronised at both ends.
    """
    import comfy.patcher_extension
    import torch

    times = CallTimes([], [], [])
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks: list = []  # start, stop, start, stop, ... of this call: perf_counter seconds or CUDA events

    def mark():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def hook_seconds() -> float:
        pairs = zip(marks[::2], marks[1::2], strict=True)
        return sum(a.elapsed_time(b) / 1000 if cuda else b - a for a, b in pairs)

    def call(executor, *args, **kwargs):
        sync()
        marks.clear()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = executor(*args, **kwargs)
        sync()
        times.wall.append(time.perf_counter() - start)
        times.cpu.append(time.process_time() - start_cpu)
        times.hooks.append(hook_seconds())
        return out

    def hook_mark(h, hsp, transformer_options):
        marks.append(mark())
        return h, hsp

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "diffbias_benchmark", call)
    patches = clone.model_options.setdefault("transformer_options", {}).setdefault("patches", {})
    patches["output_block_patch"] = [hook_mark, *patches.get("output_block_patch", []), hook_mark]
    return clone, times


def sample(model, positive, negative, size: UNetSize, steps: int, seed: int) -> None:
    """One euler run of ``steps`` model calls (batch 2: cond + uncond, cfg 7) of one image at ``size``."""
    import comfy.sample
    import torch

    latent = torch.zeros(1, 4, size.pixels // 8, size.pixels // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
                        disable_pbar=True, seed=seed)  # fmt: skip


class SeededText:
    """A stand-in text encoder (the CLIP interface the nodes call): a seeded (1, 77, context) conditioning
    per prompt text, with SDXL's pooled output when ``pooled``. Costs nothing beside a UNet step."""

    def __init__(self, context: int, pooled: bool) -> None:
        self.context = context
        self.pooled = pooled

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        import torch

        digest = hashlib.sha256(tokens.encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))
        extras = {"pooled_output": torch.randn(1, 1280, generator=generator)} if self.pooled else {}
        return [[torch.randn(1, 77, self.context, generator=generator), extras]]


def time_sampler_runs(model, device: str) -> tuple[object, list]:
    """A clone of ``model`` whose every sampler run (OUTER_SAMPLE, all steps) appends its seconds to a list.

    Clones made from it (a node's recording copy) keep the wrapper, so the runs inside a node are timed.
    """
    import comfy.patcher_extension
    import torch

    seconds: list[float] = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(executor, *args, **kwargs):
        sync()
        start = time.perf_counter()
        out = executor(*args, **kwargs)
        sync()
        seconds.append(time.perf_counter() - start)
        return out

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "diffbias_benchmark", run)
    return clone, seconds


def device_peak(device: str) -> Callable[[], int]:
    """Reset the device's peak-allocation counter; return a function that reads it (0 on the CPU)."""
    import torch

    if device != "cuda":
        return lambda: 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return lambda: (torch.cuda.synchronize(), torch.cuda.max_memory_allocated())[1]


__all__ = [
    "LAYOUTS",
    "SIZES",
    "CallTimes",
    "Layout",
    "Plugin",
    "SeededText",
    "UNetSize",
    "apply_node",
    "build_unet",
    "conditioning",
    "device_peak",
    "load_sae_node",
    "random_features",
    "reexec_with_comfyui",
    "register_sae_folder",
    "sae_file",
    "sample",
    "start",
    "time_sampler_runs",
    "timed",
]
