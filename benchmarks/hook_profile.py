"""Where the intervention's own time goes: the edit of one bottleneck map, op by op (torch.profiler).

    python benchmarks/hook_profile.py [--layout kernel8|per_token] [--mode scale|add] [--calls 10]

Runs ``diffbias_core.edit_map`` as the hook does for the conditional half of a CFG batch at the SD1.5
bottleneck (1 x 1280 x 8 x 8; ``--batch``), with the benchmark's SAEs (kernel8: 8x8 kernel, 5120 latents, k
1024, a 1.68 GB float32 encoder; per_token: 5120 latents, k 32), balance over two classes of 10 features.
Prints the median seconds of the whole edit, of the encoder's pre-activation matmul alone and of the rest,
and the profiler's table of the ops by self CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.profiler

from diffbias_core import EditSpec, FeatureSet, SparseAutoencoder, edit_map, feature_table

LAYOUTS = {"kernel8": (8, 1024), "per_token": (1, 32)}


def seconds(fn, calls: int) -> float:
    fn()
    values = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="kernel8", choices=tuple(LAYOUTS))
    parser.add_argument("--mode", default="scale", choices=("scale", "add"))
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1, help="rows edited (1: cond only, one image)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rows", type=int, default=12, help="rows of the op table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel, k = LAYOUTS[args.layout]
    sae = SparseAutoencoder(1280, 5120, k, kernel_size=kernel, hook="unet.middle", model_family="sd15")
    sae.reset_parameters(torch.Generator().manual_seed(kernel))
    sae.requires_grad_(False)
    ids = torch.randperm(5120, generator=torch.Generator().manual_seed(1))[:20].reshape(2, 10)
    features = FeatureSet(
        classes=("male", "female"), ids=(ids[0].clone(), ids[1].clone()),
        scores=(torch.linspace(1, 0.1, 10), torch.linspace(1, 0.1, 10)),
        sae_fingerprint=sae.fingerprint(), hook=sae.hook, method="random",
    )  # fmt: skip
    table = feature_table(features, 10)
    spec = EditSpec(mode=args.mode, strength=2.0 if args.mode == "scale" else 10.0, top_k=10)
    h = torch.randn(args.batch, 1280, 8, 8, generator=torch.Generator().manual_seed(2))
    rows = torch.arange(args.batch) % 2
    x = sae.map_to_inputs(h)
    with torch.inference_mode():
        whole = seconds(lambda: edit_map(h, sae, table, rows, spec), args.calls)
        matmul = seconds(lambda: sae.pre_activations(x), args.calls)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for _ in range(args.calls):
                edit_map(h, sae, table, rows, spec)
    print(
        f"{args.layout} {args.mode}, {args.batch} x 1280 x 8 x 8, {torch.get_num_threads()} threads, "
        f"median of {args.calls}: edit {1000 * whole:.1f} ms, of which the encoder's pre-activations "
        f"{1000 * matmul:.1f} ms ({100 * matmul / whole:.0f}%), the rest {1000 * (whole - matmul):.1f} ms"
    )
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
