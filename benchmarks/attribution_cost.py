"""What Attribute Bias Features costs beyond the paired sampling it needs (real ComfyUI, its own UNet).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/attribution_cost.py [--pairs 8] [--device cpu|cuda]
        [--channels 320] [--pixels 256] [--samples 4] [--steps 2] [--json out.json]

The node (``DiffBiasAttributeFeatures``, integrated gradients, the SAE from Load Bias SAE) runs on ComfyUI's
SD1.5 UNet with seeded random weights (``--channels`` base channels: 320, the real width, by default; 256 px
gives a 1280 x 4 x 4 bottleneck and a run of about 30 s on 2 CPU cores) and a stand-in text encoder; next to
each node call, the same paired runs are sampled plainly (same prompts, seeds, batches, sampler; no
recorder): ``comfy.sample.sample`` as KSampler calls it. Calls alternate (node first in even pairs, plain
first in odd ones). Two ratios, each the median over pairs with a distribution-free interval:

* ``node_over_plain``: the whole node / the plain paired sampling (goal <= 1.10);
* ``node_over_own_sampling``: the whole node / the node's own sampler runs (recorder included), timed by an
  OUTER_SAMPLE wrapper on the input model.

The per-token SAE is ``4 x width`` latents, k 32, at ``unet.middle`` (width = 4 x channels). The probe fits,
integrated gradients and the spool cost about 0.1 s beyond the sampling at 64 channels and 0.3 s at 320 on
this machine's CPU, so a narrow UNet (``--channels 64``: a run of about 1 s) shows that fixed cost as a ratio
of about 1.1, and only the real width shows the ratio a user sees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import bench_comfy as bc  # this script's folder is first on sys.path
import bench_stats as bs

PROMPTS = "a photo of a male person\na photo of a female person"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="node / plain pairs (after one warm-up pair)")
    parser.add_argument("--channels", type=int, default=320, help="UNet base channels (SD1.5: 320)")
    parser.add_argument("--pixels", type=int, default=256, help="image side (256: a 4x4 bottleneck)")
    parser.add_argument("--samples", type=int, default=4, help="images per class")
    parser.add_argument("--batch-size", type=int, default=4, help="images per sampler run")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--dtype", default="", help="UNet dtype (default float32 on the CPU, float16 on CUDA)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "diffbias_bench_cache")
    parser.add_argument(
        "--quick", action="store_true", help="1 pair, 2 steps, 4 samples, 64 channels, 128 px: a check"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.steps, args.samples, args.pixels, args.channels = 1, 2, 4, 128, 64
    return args


def node_inputs(args) -> dict:
    return dict(
        class_prompts=PROMPTS, negative_prompt="", width=args.pixels, height=args.pixels, samples=args.samples,
        batch_size=args.batch_size, steps=args.steps, cfg=5.0, sampler_name="euler", scheduler="normal", seed=0,
        method="integrated gradients", top_k=10,
    )  # fmt: skip


def plain_paired_sampling(model, text, args) -> None:
    """The sampler runs the node makes, without its recorder: run j of every class uses seed + j."""
    import comfy.sample
    import torch

    negative = text.encode_from_tokens_scheduled(text.tokenize(""))
    for prompt in PROMPTS.splitlines():
        positive = text.encode_from_tokens_scheduled(text.tokenize(prompt))
        for chunk, first in enumerate(range(0, args.samples, args.batch_size)):
            batch = min(args.batch_size, args.samples - first)
            latent = torch.zeros(batch, 4, args.pixels // 8, args.pixels // 8)
            noise = comfy.sample.prepare_noise(latent, chunk)
            comfy.sample.sample(model, noise, args.steps, 5.0, "euler", "normal", positive, negative, latent,
                                disable_pbar=True, seed=chunk)  # fmt: skip


def main() -> None:
    args = parse_args()
    bc.reexec_with_comfyui()
    import folder_paths
    import torch

    plugin = bc.start(args.device, args.threads)
    scratch = tempfile.TemporaryDirectory()  # the node's chart preview is written here, not into ComfyUI
    folder_paths.set_temp_directory(scratch.name)
    folder_paths.set_output_directory(scratch.name)
    bc.register_sae_folder(args.cache)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "float16"))
    size = bc.UNetSize("sd15", args.pixels, 768, args.pixels // 64)
    model = bc.build_unet(size, dtype, args.device, quick=False, channels=args.channels)
    width = 4 * args.channels
    layout = bc.Layout("per_token", 1, 4 * width, 32)
    name, _ = bc.sae_file(plugin, args.cache, size, layout, width, dtype)
    sae = bc.load_sae_node(plugin, name)
    text = bc.SeededText(768, pooled=False)
    node = plugin.nodes["DiffBiasAttributeFeatures"]
    timed_model, own = bc.time_sampler_runs(model, args.device)

    def run_node() -> float:
        start = time.perf_counter()
        node.execute(timed_model, text, sae, **node_inputs(args))
        return time.perf_counter() - start

    def run_plain() -> float:
        start = time.perf_counter()
        plain_paired_sampling(model, text, args)
        return time.perf_counter() - start

    whole, plain, inside = [], [], []
    for pair in range(args.pairs + 1):  # pair 0 warms up (first loads and allocations), not counted
        own.clear()
        first, second = (run_node, run_plain) if pair % 2 == 0 else (run_plain, run_node)
        a, b = first(), second()
        node_seconds, plain_seconds = (a, b) if first is run_node else (b, a)
        print(f"pair {pair}: node {node_seconds:.2f} s (its sampling {sum(own):.2f} s), plain {plain_seconds:.2f} s",
              flush=True)  # fmt: skip
        if pair:
            whole.append(node_seconds)
            plain.append(plain_seconds)
            inside.append(sum(own))
    result = {
        "command": " ".join(["python", "benchmarks/attribution_cost.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "device": args.device,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "config": {key: value for key, value in vars(args).items() if key not in ("json", "cache")},
        "seconds": {"node": whole, "plain_sampling": plain, "node_sampling": inside},
        "ratios": {
            "node_over_plain": bs.paired_ratio(whole, plain)._asdict(),
            "node_over_own_sampling": bs.paired_ratio(whole, inside)._asdict(),
        },  # fmt: skip
    }
    result["config"]["dtype"] = str(dtype).removeprefix("torch.")
    for key, value in result["ratios"].items():
        print(f"{key:24s} {bs.RatioInterval(**value)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
