"""One ``add`` edit step two ways, side by side in one run: the encoder path and the encoder-free class deltas.

For the SD1.5 bottleneck (2 x 1280 x 8 x 8) with a per-token SAE (5120 latents, k 32) and a DiffLens-layout
kernel-8 SAE (one code per 8 x 8 map: 81920 inputs; 1024 latents, k 64), the same ``add`` edit (top 10 of
2 classes) runs as

* ``encoder``: ``edit_map`` (encode, read the listed latents' values, decode their change);
* ``free``: ``add_deltas`` with the per-class delta precomputed once from the 20 listed decoder rows.

Repeats alternate (encoder, free, encoder, ...); the median of each and the ratio are printed. Run from the
repository root:

    PYTHONPATH=. python benchmarks/edit_paths.py [--repeats 15] [--threads 2] [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diffbias_core import EditSpec, FeatureSet, SparseAutoencoder, edit_map, feature_table
from diffbias_core.intervene.additive import add_deltas, class_deltas, listed_latents

LAYOUTS = {"per_token": (1, 5120, 32), "kernel8": (8, 1024, 64)}  # kernel, latents, k
SHAPE = (2, 1280, 8, 8)  # (B, C, H, W): the SD1.5 middle block at 512 px, cond + uncond


def setup(kernel: int, latents: int, k: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(SHAPE[1], latents, k, kernel_size=kernel)
    sae.reset_parameters(g)
    sae = sae.to(dtype).requires_grad_(False)
    ids = torch.randperm(latents, generator=g)[:20].reshape(2, 10)
    features = FeatureSet(("a", "b"), (ids[0].clone(), ids[1].clone()), (torch.linspace(1, 0.5, 10),) * 2,
                          sae.fingerprint(), sae.hook, "random")  # fmt: skip
    spec = EditSpec("add", 10.0, top_k=10)
    table = feature_table(features, 10)
    latents_listed = listed_latents(table)
    deltas = class_deltas(sae.w_dec_flat[latents_listed], latents_listed, table, spec)
    h = torch.randn(*SHAPE, generator=g).to(dtype)
    return sae, table, spec, deltas, h


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = torch.tensor([0, 1])
    results = {}
    with torch.inference_mode():
        for name, (kernel, latents, k) in LAYOUTS.items():
            sae, table, spec, deltas, h = setup(kernel, latents, k, dtype)
            encoder, free = [], []

            def with_encoder(h=h, sae=sae, table=table, spec=spec):
                return edit_map(h, sae, table, rows, spec)

            def without(h=h, deltas=deltas):
                return add_deltas(h, deltas, rows)

            for _ in range(args.repeats):  # interleaved
                encoder += timed(with_encoder, 1)
                free += timed(without, 1)
            diff = float((with_encoder().float() - without().float()).abs().max())
            enc_ms, free_ms = statistics.median(encoder) * 1e3, statistics.median(free) * 1e3
            results[name] = {"encoder_ms": enc_ms, "free_ms": free_ms, "speedup": enc_ms / free_ms,
                             "max_abs_difference": diff, "sae_mib": sum(p.nbytes for p in sae.parameters()) / 2**20,
                             "delta_kib": deltas.delta.nbytes / 2**10}  # fmt: skip
            print(
                f"{name}: encoder {enc_ms:.3f} ms, free {free_ms:.3f} ms ({enc_ms / free_ms:.0f}x), max |diff| "
                f"{diff:.2e}; SAE {results[name]['sae_mib']:.0f} MiB vs deltas {results[name]['delta_kib']:.0f} KiB"
            )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {"dtype": args.dtype, "threads": torch.get_num_threads(), "shape": SHAPE, **results}, file
            )


if __name__ == "__main__":
    main()
