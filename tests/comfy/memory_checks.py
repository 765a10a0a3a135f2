"""Peak memory of sampling with an encoder-free kernel-8 edit, in a fresh ComfyUI process; prints one JSON line.

Run by tests/comfy/test_edit_memory.py (cwd = ComfyUI, this folder on sys.path):

* ``python memory_checks.py make FILE``: write a random kernel-8 SAE for the small SD1.5-layout UNet's middle
  block (128 channels, 8x8 at 512 px: inputs of 128*64 = 8192) with 8192 latents, float32 (537 MB). Its own
  process, so that making it never counts in the measured peak.
* ``python memory_checks.py measure FILE``: sample the small UNet at 512 px (1 step, CFG batch of 2) twice
  unpatched, then with Load Bias SAE's handle on FILE and Apply Feature Intervention (add, top 10 of 2 classes),
  then with a scale edit (which needs the encoder); the peak RSS (``ru_maxrss``) after each.

glibc's malloc raises its mmap threshold as large blocks are freed, after which the next run's tensors come
from a fragmented heap and the peak RSS of a repeated unpatched run wanders by tens of MB. The script runs
itself again with a fixed threshold (``MALLOC_MMAP_THRESHOLD_``: every block over 64 KiB is its own mapping,
returned when freed), so the peak follows the tensors alive at once.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import comfy.cli_args
import torch

comfy.cli_args.args.cpu = True  # before the first import of comfy.model_management

import comfy.sample  # noqa: E402
from reliability_checks import PromptClip, load_plugin, plugin_module, small_unet  # noqa: E402

WIDTH, KERNEL, LATENTS, K = 128, 8, 8192, 64


def peak_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make(path: Path) -> None:
    load_plugin()
    core = plugin_module("diffbias_core")
    sae = core.SparseAutoencoder(
        WIDTH, LATENTS, K, kernel_size=KERNEL, hook="unet.middle", model_family="sd15"
    )
    sae.reset_parameters(torch.Generator().manual_seed(0))
    core.save_sae(sae, path)
    print("RESULTS " + json.dumps({"file_bytes": path.stat().st_size}))


def sample(model, seed: int = 3) -> torch.Tensor:
    clip = PromptClip()
    positive = clip.encode_from_tokens_scheduled("a photo of a person")
    negative = clip.encode_from_tokens_scheduled("")
    latent = torch.zeros(1, 4, 64, 64)  # (batch, channels, 512 px / 8, 512 px / 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 1, 5.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)  # fmt: skip


def measure(path: Path) -> None:
    node_classes = load_plugin()
    core = plugin_module("diffbias_core")
    lazy = plugin_module("diffbias_core.sae.lazy")
    wires = plugin_module("nodes.wires")
    model = small_unet()
    out: dict = {"file_bytes": path.stat().st_size}
    plain = sample(model)
    out["unpatched_1"] = peak_bytes()
    sample(model)
    out["unpatched_2"] = peak_bytes()
    start = time.perf_counter()
    handle = lazy.open_sae(path)
    ids = torch.randperm(LATENTS, generator=torch.Generator().manual_seed(1))[:20].reshape(2, 10)
    features = core.FeatureSet(("a", "b"), (ids[0].clone(), ids[1].clone()), (torch.linspace(1, 0.5, 10),) * 2,
                               handle.fingerprint(), "unet.middle", "random")  # fmt: skip
    wire = wires.SaeWire(handle, str(path))
    widgets = dict(mode="balance", target="", edit="add", strength=10.0, top_k=10, start_percent=0.0,
                   end_percent=1.0, cond_only=True, seed=0)  # fmt: skip
    apply = node_classes["DiffBiasApplyIntervention"]
    patched = apply.execute(model, wire, features, **widgets).args[0]
    out["apply_seconds"] = time.perf_counter() - start
    edited = sample(patched)
    out["add"] = peak_bytes()
    out["add_changed"] = bool((edited != plain).any())
    out["add_loaded_whole_sae"] = handle.is_loaded
    del patched
    scaled = apply.execute(model, wire, features, **{**widgets, "edit": "scale", "strength": 2.0}).args[0]
    sample(scaled)
    out["scale"] = peak_bytes()
    print("RESULTS " + json.dumps(out))


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        )
    torch.set_num_threads(2)
    {"make": make, "measure": measure}[sys.argv[1]](Path(sys.argv[2]))
