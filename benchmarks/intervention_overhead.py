"""Sampling-step cost of Apply Feature Intervention beside the unpatched UNet, with intervals (real ComfyUI).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/intervention_overhead.py [--sizes sd15,sdxl]
        [--modes add,scale] [--layouts per_token,kernel8] [--blocks 8] [--device cpu|cuda] [--json out.json]

For each size (ComfyUI's own SD1.5 UNet at 512 px, SDXL UNet at 1024 px, seeded random weights), SAE files
are written once to ``--cache`` and loaded by Load Bias SAE; Apply Feature Intervention patches the UNet at
``unet.middle`` (balance two classes, 10 features each, cond only; ``add`` 10 or ``scale`` 2) with a
per-token SAE (5120 latents, k 32) and the DiffLens kernel-8 layout (an 8x8 kernel over the whole 1280x8x8
SD1.5 map, 5120 latents, k 1024, one code per image; SDXL's 32x32 map does not fit it and the product
refuses it, which is reported).

Timing: one image (a batch of 2 per step: cond + uncond, cfg 7, euler). Every variant (the unpatched UNet and
each patched one) samples ``--steps-per-call`` model calls per turn; a block is one turn of every variant
in a fresh random order, so the calls of one block are next to each other in time and drift of the machine's
load hits them alike. Each patched variant's ratio is the median over blocks of (its time / the unpatched
time of the same block), with a distribution-free 95% interval (``bench_stats.median_interval``); in wall
time, in process CPU time (CPU device), and as implied by the hook's own time inside the step (two timer
patches around the plugin's output-block patch): 1 + hook / unpatched step, the steadiest figure; and
``outside_hook``, (patched step - its hook) / unpatched step, which is 1 unless the patch costs time elsewhere.

Memory: each variant samples one step in its own child process; the peak RSS of that step (VmHWM reset
just before it, so building the UNet does not count; the SAE loaded before it does, being resident) and, on
CUDA, ``max_memory_allocated``, beside the unpatched child's, with glibc's mmap threshold fixed in every memory child
(``MALLOC_MMAP_THRESHOLD_``, see ``run_child``). Load Bias SAE + Apply's own peak is reported
apart. ``--quick``: 64-channel UNets of the same layouts and few blocks (checks the script end to end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_comfy as bc  # this script's folder is first on sys.path
import bench_stats as bs

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "diffbias_bench_cache"
DEFAULT_DTYPES = {
    "cpu": {"sd15": "float32", "sdxl": "bfloat16"},
    "cuda": {"sd15": "float16", "sdxl": "float16"},
}
"""CPU: SD1.5 in float32 (ComfyUI's CPU default); SDXL in bfloat16 (its float32 weights alone are 10.3 GB
and a 1024 px step takes minutes on 2 cores). CUDA: float16, ComfyUI's usual GPU dtype."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="sd15,sdxl", help="comma list of sd15, sdxl")
    parser.add_argument("--modes", default="add,scale", help="comma list of add, scale")
    parser.add_argument("--layouts", default="per_token,kernel8", help="comma list of per_token, kernel8")
    parser.add_argument(
        "--blocks", default="", help="blocks per size (default sd15:8,sdxl:2; --quick 2 each)"
    )
    parser.add_argument("--steps-per-call", type=int, default=1, help="model calls per turn (sampler steps)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--dtype", default="", help="UNet dtype for every size (default: per device and size)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--memory", default="sd15:unpatched+add_kernel8+scale_kernel8+add_per_token",
                        help="per size, the variants measured in child processes ('' for none)")  # fmt: skip
    parser.add_argument(
        "--timing", action=argparse.BooleanOptionalAction, default=True, help="time the steps"
    )
    parser.add_argument("--child-timeout", type=int, default=1800, help="seconds for each child process")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder of the SAE files (kept)")
    parser.add_argument(
        "--quick", action="store_true", help="64-channel UNets, 2 blocks: an end-to-end check"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the block orders")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--child", choices=("timing", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.blocks = args.blocks or ("sd15:2,sdxl:2" if args.quick else "sd15:8,sdxl:2")
    return args


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def per_size(text: str) -> dict[str, str]:
    """``"sd15:8,sdxl:2"`` -> {"sd15": "8", "sdxl": "2"}."""
    return dict(part.split(":", 1) for part in split(text))


def dtype_of(args, size: str):
    import torch

    return getattr(torch, args.dtype or DEFAULT_DTYPES[args.device][size])


def setup(args, size_name: str):
    """Plugin, the UNet of ``size_name``, its conditioning and the SAE width (in a child process)."""
    plugin = bc.start(args.device, args.threads)
    bc.register_sae_folder(args.cache)
    size = bc.SIZES[size_name]
    model = bc.build_unet(size, dtype_of(args, size_name), args.device, args.quick)
    width = (bc.SMALL_WIDTH if args.quick else 320) * 4  # channel_mult ends at 4 in both layouts
    return plugin, size, model, width


def patched_variants(args, plugin, size, model, width, wanted: list[str] | None = None):
    """{variant name: patched MODEL} through Load Bias SAE and Apply Feature Intervention; file sizes."""
    variants, files = {}, {}
    for layout_name in split(args.layouts):
        names = [f"{mode}_{layout_name}" for mode in split(args.modes)]
        layout = bc.LAYOUTS[layout_name]
        if (wanted is not None and not set(names) & set(wanted)) or not fits(layout, size):
            continue
        name, fingerprint = bc.sae_file(plugin, args.cache, size, layout, width, dtype_of(args, size.family))
        files[layout_name] = (args.cache / name).stat().st_size
        sae = bc.load_sae_node(plugin, name)
        features = bc.random_features(plugin, fingerprint, layout.latents)
        for mode in split(args.modes):
            if wanted is None or f"{mode}_{layout_name}" in wanted:
                variants[f"{mode}_{layout_name}"] = bc.apply_node(plugin, model, sae, features, mode)
    return variants, files


def fits(layout, size) -> bool:
    """A K x K-kernel SAE codes one K x K map: only a bottleneck of that side fits it."""
    return layout.kernel == 1 or layout.kernel == size.middle


def timing_child(args) -> dict:
    plugin, size, model, width = setup(args, args.size)
    variants, files = patched_variants(args, plugin, size, model, width)
    positive, negative = bc.conditioning(size)
    runs = {
        name: bc.timed(patched, args.device) for name, patched in {"unpatched": model, **variants}.items()
    }
    skipped = {
        f"{mode}_{name}": f"a {layout.kernel}x{layout.kernel}-kernel SAE codes one {layout.kernel}x{layout.kernel} "
        f"map; this UNet's bottleneck at {size.pixels} px is {size.middle}x{size.middle}"
        for name, layout in bc.LAYOUTS.items() if name in split(args.layouts) and not fits(layout, size)
        for mode in split(args.modes)
    }  # fmt: skip
    for name, (run, times) in list(runs.items()):  # warm-up: first allocations and loads, not counted
        try:
            bc.sample(run, positive, negative, size, 1, 0)
        except (ValueError, RuntimeError) as error:  # a layout the product refuses at this size
            skipped[name] = f"{type(error).__name__}: {error}"
            del runs[name]
        for series in times:
            series.clear()
    rng = random.Random(args.seed)
    blocks = max(1, int(per_size(args.blocks).get(args.size, 2)))
    for block in range(blocks):
        order = list(runs)
        rng.shuffle(order)
        for name in order:
            bc.sample(runs[name][0], positive, negative, size, args.steps_per_call, block + 1)
            print(
                f"{args.size} block {block + 1}/{blocks} {name}: {runs[name][1].wall[-1]:.3f} s/step",
                flush=True,
            )
        result = summary(args, size, width, files, {name: times for name, (_, times) in runs.items()})
        result.update(skipped=skipped, partial=block + 1 < blocks)
        write_json(
            args.out, result
        )  # after every block: a run stopped by its time limit keeps what it measured
    return result


def write_json(path: Path, value: dict) -> None:
    """Write ``value`` to ``path`` through a temporary file and a rename (never half written)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def summary(args, size, width: int, files: dict, times: dict) -> dict:
    """Per-block seconds of every variant and each patched variant's ratios to the unpatched UNet."""
    import torch

    calls = args.steps_per_call
    blocks = len(times["unpatched"].wall) // calls
    per_block = {
        name: {key: [sum(series[b * calls : (b + 1) * calls]) for b in range(blocks)]
               for key, series in series_of._asdict().items()}
        for name, series_of in times.items()
    }  # fmt: skip
    base = per_block["unpatched"]
    ratios = {}
    for name, block in per_block.items():
        if name == "unpatched":
            continue
        extra = [h - u for h, u in zip(block["hooks"], base["hooks"], strict=True)]
        ratios[name] = {
            "wall": bs.paired_ratio(block["wall"], base["wall"])._asdict(),
            "hook_implied": bs.implied_ratio(extra, base["wall"])._asdict(),
            "outside_hook": bs.paired_ratio(
                [w - e for w, e in zip(block["wall"], extra, strict=True)], base["wall"]
            )._asdict(),
            **({"cpu": bs.paired_ratio(block["cpu"], base["cpu"])._asdict()} if args.device == "cpu" else {}),
        }
    return {
        "pixels": size.pixels, "dtype": str(dtype_of(args, args.size)).removeprefix("torch."),
        "unet_channels": bc.SMALL_WIDTH if args.quick else 320, "sae_width": width, "blocks": blocks,
        "steps_per_call": calls, "threads": torch.get_num_threads(), "sae_file_bytes": files,
        "seconds_per_block": per_block, "ratios": ratios,
    }  # fmt: skip


def memory_child(args) -> dict:
    plugin, size, model, width = setup(args, args.size)
    positive, negative = bc.conditioning(size)
    before = bs.rss_bytes()
    bs.reset_peak_rss()
    files = {}
    if args.variant != "unpatched":
        variants, files = patched_variants(args, plugin, size, model, width, [args.variant])
        model = variants[args.variant]
    load_peak = bs.peak_rss_bytes()
    bs.reset_peak_rss()
    read_device = bc.device_peak(args.device)
    bc.sample(model, positive, negative, size, 1, 0)
    return {"rss_before_bytes": before, "load_peak_bytes": load_peak, "sampling_peak_bytes": bs.peak_rss_bytes(),
            "device_peak_bytes": read_device(), "sae_file_bytes": files}  # fmt: skip


def without_json(argv: list[str]) -> list[str]:
    """The command line less ``--json PATH`` / ``--json=PATH`` (only the parent writes the JSON)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            kept.append(arg)
    return kept


def run_child(args, kind: str, size: str, variant: str = "") -> dict:
    """Run this script as a ``kind`` child for ``size`` (and ``variant``); its JSON result or an error."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        passed = without_json(sys.argv[1:])
        command = [sys.executable, __file__, *passed, "--child", kind, "--size", size, "--out", str(out)]
        command += ["--variant", variant] if variant else []
        # memory: glibc's malloc raises its mmap threshold as large blocks are freed, and a child's peak then
        # wanders with its heap's history (~75 MiB between two unpatched fp32 SD1.5 children); a fixed
        # threshold makes every block over 64 KiB its own mapping, so the peak follows the tensors alive at once
        env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if kind == "memory" else {})}
        try:
            done = subprocess.run(
                command, timeout=args.child_timeout, stdout=None, stderr=subprocess.PIPE, text=True, env=env
            )
        except subprocess.TimeoutExpired:
            if out.is_file():  # the blocks measured before the limit
                return {**json.loads(out.read_text()), "partial": True}
            return {"error": f"timed out after {args.child_timeout} s"}
        if done.returncode != 0 or not out.is_file():
            return {"error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
        return json.loads(out.read_text())


def memory_summary(children: dict, files: dict, device: str) -> dict:
    """Patched minus unpatched peaks (RSS; CUDA allocations on a GPU), also as shares of the SAE file's size."""
    base = children.get("unpatched", {})
    summary = {}
    for name, child in children.items():
        if name == "unpatched" or "error" in child or "error" in base:  # variant#2 ... are compared too
            continue
        size = files.get(name.split("#")[0].split("_", 1)[-1]) or next(
            iter(child["sae_file_bytes"].values()), 0
        )
        entry = {}
        for key in (
            "sampling_peak_bytes",
            "load_peak_bytes",
            *(("device_peak_bytes",) if device == "cuda" else ()),
        ):
            extra = child[key] - base[key]
            entry[key.replace("_bytes", "_extra_bytes")] = extra
            entry[key.replace("_bytes", "_extra_of_file")] = extra / size if size else None
        summary[name] = entry
    return summary


def report(results: dict) -> None:
    for size, result in results["sizes"].items():
        timing = result["timing"]
        if "error" in timing:
            print(f"\n{size}: timing: {timing['error']}")
        else:
            report_timing(size, timing)
        for name, child in result.get("memory", {}).items():
            if "error" in child:
                print(f"  {name:16s} memory child failed: {child['error'][-300:]}")
        for name, entry in result.get("memory_summary", {}).items():
            for key in ("sampling_peak", "load_peak", "device_peak"):
                if f"{key}_extra_bytes" in entry:
                    print(f"  {name:16s} {key.replace('_', ' ')} {entry[f'{key}_extra_bytes'] / 2**20:+9.1f} MiB "
                          f"({100 * (entry[f'{key}_extra_of_file'] or 0):+.2f}% of the SAE file) above unpatched")  # fmt: skip


def report_timing(size: str, timing: dict) -> None:
    if timing.get("partial"):
        print(f"\n{size}: stopped by --child-timeout after {timing['blocks']} block(s)")
    print(f"\n{size} UNet at {timing['pixels']} px, {timing['dtype']}, {timing['threads']} threads, "
          f"{timing['blocks']} blocks x {timing['steps_per_call']} call(s)")  # fmt: skip
    for name, block in timing["seconds_per_block"].items():
        print(f"  {name:16s} median {bs.median_interval(block['wall']).ratio:8.3f} s per turn")
    for name, ratios in timing["ratios"].items():
        for kind, value in ratios.items():
            print(f"  {name:16s} {kind:12s} {bs.RatioInterval(**value)}")
    for name, reason in timing["skipped"].items():
        print(f"  {name:16s} not run: {reason[:300]}")


def main() -> None:
    args = parse_args()
    bc.reexec_with_comfyui()
    if args.child:
        result = timing_child(args) if args.child == "timing" else memory_child(args)
        write_json(args.out, result)
        return
    results = {"command": " ".join(["python", "benchmarks/intervention_overhead.py", *sys.argv[1:]]),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": args.device},
               "sizes": {}}  # fmt: skip
    memory = {size: variants.split("+") for size, variants in per_size(args.memory).items()}
    for size in split(args.sizes):
        timing = run_child(args, "timing", size) if args.timing else {"error": "not run (--no-timing)"}
        children = {}
        for variant in memory.get(size, []):  # a repeated variant is kept as variant#2, ... (the noise)
            key = (
                variant
                if variant not in children
                else f"{variant}#{sum(k.split('#')[0] == variant for k in children) + 1}"
            )
            children[key] = run_child(args, "memory", size, variant)
        result = {"timing": timing, "memory": children}
        if children:
            result["memory_summary"] = memory_summary(children, timing.get("sae_file_bytes", {}), args.device)
        results["sizes"][size] = result
        if args.json:
            write_json(args.json, results)
    report(results)


if __name__ == "__main__":
    main()
