"""Sampling-step time of an SD1.5-architecture UNet with and without the feature intervention (real ComfyUI).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/intervention_overhead.py [--json out.json]

Builds ComfyUI's own SD1.5 UNet with random weights, samples one image (a batch of 2 per step: cond +
uncond) at 512x512 through ``comfy.sample.sample`` with euler (one model call per step) and times every
model call with an APPLY_MODEL wrapper. Three models take turns run by run, in rotated order, so drifting
machine load hits them alike:

* ``unpatched``: the UNet as loaded;
* ``per_token``: Apply Feature Intervention at ``unet.middle`` with a per-token SAE (1280 -> 5120 latents, k 32);
* ``kernel8``: the same with a DiffLens-layout SAE (8x8 kernel over the whole 1280x8x8 map, 5120 latents,
  k 1024; one code per image).

Both edits: balance mode, two classes, 10 features per class, add 10, cond only (the defaults). Prints the
median step time of each and the ratios patched / unpatched (goal: <= 1.03), in wall-clock time and in
process CPU time, and the cost of the hook alone with the ratio it implies (the steadiest figure on a
machine shared with other jobs, where step times drift by more than the overhead). ComfyUI is imported from
COMFYUI_PATH (with the repository's test stub for torchvision when torchvision is not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def reexec_with_comfyui() -> None:
    """Start this script again with ComfyUI importable (COMFYUI_PATH on PYTHONPATH)."""
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui or not (Path(comfyui) / "comfy").is_dir():
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (the folder holding main.py)")
    parts = [comfyui, str(REPO)]
    if importlib.util.find_spec("torchvision") is None:
        parts.insert(0, str(REPO / "tests" / "comfy" / "stubs"))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(parts + [os.environ.get("PYTHONPATH", "")]),
        DIFFBIAS_BENCH_CHILD="1",
    )
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def comfy_test_tools():
    """tests/comfy/make_checkpoint.py, the one home of the SD1.5 UNet config and the seeded random weights."""
    path = REPO / "tests" / "comfy" / "make_checkpoint.py"
    spec = importlib.util.spec_from_file_location("diffbias_make_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_unet(size: str):
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    tools = comfy_test_tools()
    config = tools.sd15_unet_config(torch.float32, model_channels=320 if size == "sd15" else 64)
    base = comfy.supported_models.SD15(config).get_model({})
    tools.randomize_(base.diffusion_model, torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def make_sae_and_features(width: int, kernel: int, latents: int, k: int):
    import torch

    from diffbias_core import FeatureSet, SparseAutoencoder

    sae = SparseAutoencoder(width, latents, k, kernel_size=kernel, hook="unet.middle", model_family="sd15")
    sae.reset_parameters(torch.Generator().manual_seed(kernel))
    ids = torch.randperm(latents, generator=torch.Generator().manual_seed(1))[:20].reshape(2, 10)
    features = FeatureSet(
        classes=("male", "female"),
        ids=(ids[0].clone(), ids[1].clone()),
        scores=(torch.linspace(1, 0.1, 10), torch.linspace(1, 0.1, 10)),
        sae_fingerprint=sae.fingerprint(),
        hook=sae.hook,
        method="random",
    )
    return sae, features


def timed(model, wall: list[float], cpu: list[float]):
    """A clone of ``model`` whose every diffusion-model call (one per euler step) appends its wall-clock and
    process CPU seconds to ``wall`` and ``cpu``."""
    import comfy.patcher_extension

    def timer(executor, *args, **kwargs):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = executor(*args, **kwargs)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        return out

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "diffbias_benchmark", timer)
    return clone


def hook_seconds(patched, h, repeats: int) -> float:
    """Median seconds of the installed intervention hook alone on h (2, C, H, W), cond + uncond rows."""
    import torch

    edit = patched.model_options["transformer_options"]["patches"]["output_block_patch"][0].fn
    options = {"cond_or_uncond": [1, 0], "sigmas": torch.ones(1)}
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        edit(h, options)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def sample_once(model, positive, negative, latent_size: int, steps: int, seed: int) -> None:
    import comfy.sample
    import torch

    latent = torch.zeros(1, 4, latent_size, latent_size)
    noise = comfy.sample.prepare_noise(latent, seed)
    comfy.sample.sample(
        model, noise, steps, 7.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=seed
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the timings and ratios to this file")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps (model calls) per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one run per model, in rotated order")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--small", action="store_true", help="a 64-channel UNet (checks the script quickly)")
    args = parser.parse_args()
    if importlib.util.find_spec("comfy") is None and not os.environ.get("DIFFBIAS_BENCH_CHILD"):
        reexec_with_comfyui()

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import torch

    import nodes as comfy_nodes

    if args.threads:
        torch.set_num_threads(args.threads)
    if not asyncio.run(comfy_nodes.load_custom_node(str(REPO))):
        sys.exit("ComfyUI's loader could not load the plugin")
    plugin = str(REPO).replace(".", "_x_")
    patching = sys.modules[plugin + ".nodes.patching"]
    parse_hook = sys.modules[plugin + ".nodes.model_info"].parse_hook
    from diffbias_core import EditSpec

    model = build_unet("small" if args.small else "sd15")
    width = 256 if args.small else 1280
    latent_size = args.size // 8
    middle = latent_size // 8
    generator = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    models = {"unpatched": model}
    layouts = {"per_token": (1, 5120, 32), "kernel8": (middle, 5120, 1024)}
    for name, (kernel, latents, k) in layouts.items():
        sae, features = make_sae_and_features(width, kernel, latents, k)
        models[name] = patching.add_intervention(
            model,
            parse_hook("unet.middle"),
            sae,
            features,
            EditSpec(mode="add", strength=10.0, top_k=10),
            weights=(1.0, 1.0),
            fixed=None,
            seed=0,
            window=(0.0, 1.0),
            cond_only=True,
        )
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    runs = {name: timed(patched, times[name], cpu[name]) for name, patched in models.items()}
    names = list(models)
    for name in names:  # warm-up: first loads, allocations, the SAE's working copy; not counted
        sample_once(runs[name], positive, negative, latent_size, 1, 0)
        times[name].clear()
        cpu[name].clear()
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            sample_once(runs[name], positive, negative, latent_size, args.steps, round_index)
            print(
                f"round {round_index + 1}/{args.rounds} {name}: {times[name][-1]:.3f} s/step "
                f"({cpu[name][-1]:.3f} s CPU)",
                flush=True,
            )
    h = torch.randn(2, width, middle, middle, generator=generator)
    hook = {name: hook_seconds(models[name], h, 20) for name in layouts}
    median = {name: statistics.median(values) for name, values in times.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    ratios = {name: median[name] / median["unpatched"] for name in models if name != "unpatched"}
    cpu_ratios = {name: median_cpu[name] / median_cpu["unpatched"] for name in models if name != "unpatched"}
    print(
        f"\nSD1.5-architecture UNet{' (small)' if args.small else ''}, {args.size}x{args.size}, batch 2 "
        f"(cond + uncond), euler, {torch.get_num_threads()} threads; median of {len(times['unpatched'])} steps"
    )
    for name in models:
        extra = (
            f"  ratio {ratios[name]:.4f} (CPU time ratio {cpu_ratios[name]:.4f})" if name in ratios else ""
        )
        print(f"  {name:10s} {median[name]:8.3f} s/step  {median_cpu[name]:8.3f} s CPU/step{extra}")
    estimate = {name: 1 + hook[name] / median["unpatched"] for name in hook}
    print(
        f"the hook alone (median of 20 calls on the 2 x {width} x {middle} x {middle} bottleneck), the ratio it implies:"
    )
    for name in hook:
        print(f"  {name:10s} {hook[name] * 1000:8.1f} ms/step  estimated ratio {estimate[name]:.4f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": args.size,
                    "small": args.small,
                    "threads": torch.get_num_threads(),
                    "seconds": times,
                    "cpu_seconds": cpu,
                    "median": median,
                    "median_cpu": median_cpu,
                    "ratios": ratios,
                    "cpu_ratios": cpu_ratios,
                    "hook_seconds": hook,
                    "estimated_ratios": estimate,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
