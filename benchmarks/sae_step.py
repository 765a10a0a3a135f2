"""Cost of one intervention step: ``apply_edit`` next to a dense reference, measured side by side in one run.

For each h-space size (SD1.5: 2 x 1280 x 8 x 8; SDXL: 2 x 1280 x 32 x 32) with a 5120-latent, k = 32 SAE,
both implementations encode the activation, edit the top features of the row's class and decode:

* ``apply_edit`` (diffbias): reads z_j of the selected latents from the top-k code and decodes only
  their change from the selected decoder rows.
* dense reference: scatters the top-k code into dense (tokens, latents) latents, edits them, and decodes
  the dense change with the whole decoder.

Repeats are interleaved (sparse, dense, sparse, ...) and the median of each is reported, with the ratio.
``encode`` is the encoder alone (pre-activations + top-k), the part both must pay. Run from the repository
root (or with diffbias installed):

    PYTHONPATH=. python benchmarks/sae_step.py [--repeats 9] [--threads 1] [--device cpu] [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diffbias_core import EditSpec, FeatureSet, SparseAutoencoder, apply_edit, feature_table

CASES = {"sd15 2x1280x8x8": (2, 1280, 8, 8), "sdxl 2x1280x32x32": (2, 1280, 32, 32)}
NUM_LATENTS, K, TOP_K = 5120, 32, 10


def dense_edit(x, sae, table, sample_class, spec):
    """Reference: dense latents, dense edit (scale mode), dense decode of the change."""
    code = sae.encode(x)
    z = torch.zeros(*x.shape[:-1], sae.num_latents, dtype=code.values.dtype, device=x.device)
    z.scatter_(-1, code.indices, code.values)  # (B, P, L)
    ids = table.ids[sample_class]  # (B, top_k)
    selected = z.gather(-1, ids[:, None, :].expand(-1, z.shape[1], -1))  # (B, P, top_k)
    new = z.scatter(-1, ids[:, None, :].expand(-1, z.shape[1], -1), selected * spec.strength)
    return x + ((new - z) @ sae.w_dec_flat).to(x.dtype)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_case(shape, repeats, device, dtype):
    g = torch.Generator().manual_seed(0)
    batch, channels, height, width = shape
    sae = SparseAutoencoder(channels, NUM_LATENTS, K, hook="unet.middle")
    sae.reset_parameters(g)
    sae = sae.to(device=device, dtype=dtype).requires_grad_(False)
    ids = torch.randperm(NUM_LATENTS, generator=g)[: 2 * TOP_K]
    features = FeatureSet(("a", "b"), (ids[:TOP_K], ids[TOP_K:]), (torch.ones(TOP_K), torch.ones(TOP_K)),
                          sae.fingerprint(), sae.hook, "benchmark")  # fmt: skip
    table = feature_table(features, TOP_K, device=device)
    h = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    x = sae.map_to_inputs(h)  # (B, H*W, C)
    sample_class = torch.arange(batch, device=device) % 2
    spec = EditSpec("scale", 3.0, top_k=TOP_K)
    with torch.inference_mode():
        torch.testing.assert_close(
            apply_edit(x, sae, table, sample_class, spec).float(),
            dense_edit(x, sae, table, sample_class, spec).float(),
            atol=1e-2, rtol=1e-2,
        )  # fmt: skip
        runs = {
            "encode": lambda: sae.encode(x),
            "apply_edit": lambda: apply_edit(x, sae, table, sample_class, spec),
            "dense": lambda: dense_edit(x, sae, table, sample_class, spec),
        }
        for fn in runs.values():  # warm-up
            fn()
        times = {name: [] for name in runs}
        for r in range(repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                times[name].append(timed(runs[name], device))
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return {**{f"{name}_ms": value for name, value in medians.items()},
            "ratio_apply_edit_to_dense": medians["apply_edit"] / medians["dense"],
            "ratio_apply_edit_to_encode": medians["apply_edit"] / medians["encode"], "repeats": repeats}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=9, help="interleaved repeats per implementation (median)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results = {name: run_case(shape, args.repeats, device, dtype) for name, shape in CASES.items()}
    print(f"SAE {NUM_LATENTS} latents, k {K}, top_k {TOP_K}; {args.device} {args.dtype}, {args.threads} threads, "
          f"median of {args.repeats} interleaved repeats")  # fmt: skip
    print(
        f"{'case':<20} {'encode ms':>10} {'apply_edit ms':>14} {'dense ms':>10} {'edit/dense':>11} {'edit/encode':>12}"
    )
    for name, r in results.items():
        print(f"{name:<20} {r['encode_ms']:>10.2f} {r['apply_edit_ms']:>14.2f} {r['dense_ms']:>10.2f} "
              f"{r['ratio_apply_edit_to_dense']:>11.3f} {r['ratio_apply_edit_to_encode']:>12.3f}")  # fmt: skip
    if args.json:
        setup = {"device": args.device, "dtype": args.dtype, "threads": args.threads, "num_latents": NUM_LATENTS,
                 "k": K, "top_k": TOP_K}  # fmt: skip
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"setup": setup, "cases": results}, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
