"""SAE training speed and quality beside EleutherAI's sparsify, on the same activations, in one run.

    python benchmarks/sae_training.py [--d-in 256 --latents 4096 --k 32 --tokens 262144] [--json out.json]

(from the repository root, with diffbias installed, ``pip install -e .``, or ``PYTHONPATH=.``).

Run it with a Python that has ``eai-sparsify`` installed (a separate virtual environment made with
``--system-site-packages`` keeps this machine's torch): sparsify's own ``Trainer`` is driven through a
stand-in model whose hooked layer returns the activations (one "sequence" = one 8 x 8 map = 64 tokens).
Without sparsify, a reimplementation of its published training step is timed instead and named so in
the output. Both train one pass over the same synthetic activations (sparse non-negative codes over a
random dictionary plus noise) with the same width, latents, k, rows per step, Adam learning rate,
warm-up then linear decay to zero, AuxK weight and dead-latent threshold; everything else is each
trainer's own recipe. The two alternate ``--repeats`` times and each one's fastest run counts. Prints
tokens (rows) per second and the held-out FVU of both, and the ratios ours / sparsify (goals: speed ratio
>= 1, FVU ratio <= 1.05).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffbias_core.dissect.activations import MemorySource, make_batch
from diffbias_core.dissect.train import TrainConfig, train_sae
from diffbias_core.sae.model import fvu

SEQ = 64  # tokens per "sequence" fed to sparsify (one 8 x 8 map)


def activations(d_in: int, atoms: int, active: int, rows: int, seed: int) -> torch.Tensor:
    """(rows, d_in) float32: `active` of `atoms` unit directions per row, exponential weights, noise."""
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(atoms, d_in, generator=g), dim=1)
    out = torch.empty(rows, d_in)
    for start in range(0, rows, 8192):
        n = min(8192, rows - start)
        idx = torch.rand(n, atoms, generator=g).topk(active, dim=1).indices
        val = torch.empty(n, active).exponential_(generator=g)
        out[start : start + n] = F.embedding_bag(idx, dictionary, per_sample_weights=val, mode="sum")
    return out + 0.05 * torch.randn(rows, d_in, generator=g) + torch.randn(d_in, generator=g)


def run_ours(train: torch.Tensor, args, steps: int) -> tuple[float, nn.Module]:
    config = TrainConfig(num_latents=args.latents, k=args.k, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=args.warmup, lr_schedule="linear", max_steps=steps, auxk_alpha=1 / 32,
                         dead_after_rows=args.dead_rows, seed=args.seed)  # fmt: skip
    source = MemorySource(make_batch(train, 0), hook="bench")
    start = time.perf_counter()
    sae = train_sae(source, config).sae
    return time.perf_counter() - start, sae


def run_sparsify(train: torch.Tensor, args, steps: int):
    """sparsify's Trainer on a stand-in model whose layer returns rows of ``train``."""
    from datasets import Dataset
    from sparsify import SparseCoderConfig
    from sparsify import TrainConfig as SparsifyConfig
    from sparsify.trainer import Trainer
    from transformers import PretrainedConfig, PreTrainedModel

    class TableConfig(PretrainedConfig):
        model_type = "activation-table"

    class Table(PreTrainedModel):
        config_class = TableConfig

        def __init__(self, config, table):
            super().__init__(config)
            self.table = nn.Parameter(table, requires_grad=False)  # (rows, d_in)
            self.layers = nn.ModuleList([nn.Identity()])

        def forward(self, input_ids, **_):
            return self.layers[0](self.table[input_ids])  # (batch, SEQ, d_in)

    sequences = train.shape[0] // SEQ
    model = Table(TableConfig(num_hidden_layers=1), train[: sequences * SEQ])
    ids = torch.arange(sequences * SEQ).reshape(sequences, SEQ)
    dataset = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    with tempfile.TemporaryDirectory() as folder:
        cfg = SparsifyConfig(SparseCoderConfig(num_latents=args.latents, k=args.k), batch_size=args.batch_size // SEQ,
                             optimizer="adam", lr=args.lr, lr_warmup_steps=args.warmup, auxk_alpha=1 / 32,
                             dead_feature_threshold=args.dead_rows, hookpoints=["layers.0"], save_dir=folder,
                             log_to_wandb=False, save_every=10**9, init_seeds=[args.seed])  # fmt: skip
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):  # its log lines
            trainer = Trainer(cfg, dataset, model)
            start = time.perf_counter()
            trainer.fit()
            seconds = time.perf_counter() - start
    coder = trainer.saes["layers.0"]
    return seconds, lambda x: coder(x).sae_out


class SparsifyStepReimplementation(nn.Module):
    """sparsify's published training step, written out: TopK encoder whose backward reaches only the
    selected latents (no ReLU mask), embedding_bag decoder, AuxK on the residual, FVU loss."""

    def __init__(self, d_in: int, latents: int, k: int, seed: int):
        super().__init__()
        self.encoder = nn.Linear(d_in, latents)
        bound = 1 / math.sqrt(d_in)  # nn.Linear's default (kaiming-uniform) draw, from a seeded generator
        self.encoder.weight.data = (
            torch.rand(latents, d_in, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        ) * bound
        self.encoder.bias.data.zero_()
        self.W_dec = nn.Parameter(F.normalize(self.encoder.weight.data.clone(), dim=1))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.k = k

    def encode(self, x):
        pre = F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))
        values, indices = pre.detach().topk(self.k, dim=1, sorted=False)
        values = pre.gather(1, indices)  # autograd reaches the selected entries only
        return values, indices, pre

    def forward(self, x, dead=None):
        values, indices, pre = self.encode(x)
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec
        error = x - out
        total = (x - x.mean(0)).pow(2).sum()
        auxk = out.new_zeros(())
        if dead is not None and int(dead.sum()):
            k_aux = x.shape[1] // 2
            scale, k_aux = min(int(dead.sum()) / k_aux, 1.0), min(k_aux, int(dead.sum()))
            aux_v, aux_i = torch.where(dead[None], pre.detach(), -math.inf).topk(k_aux, sorted=False)
            e_hat = F.embedding_bag(aux_i, self.W_dec, per_sample_weights=aux_v, mode="sum")
            auxk = scale * (e_hat - error.detach()).pow(2).sum() / total
        return out, indices, error.pow(2).sum() / total, auxk


def run_reimplementation(train: torch.Tensor, args, steps: int):
    sae = SparsifyStepReimplementation(train.shape[1], args.latents, args.k, args.seed)
    adam = torch.optim.Adam(sae.parameters(), lr=args.lr)
    since_fired = torch.zeros(args.latents, dtype=torch.long)
    start = time.perf_counter()
    for step in range(steps):
        x = train[step * args.batch_size : (step + 1) * args.batch_size]
        if step == 0:
            sae.b_dec.data = x.mean(0)
        for group in adam.param_groups:  # linear warm-up from 0, then linear decay to 0
            group["lr"] = args.lr * (step / args.warmup if step < args.warmup else
                                     max(0.0, (steps - step) / max(1, steps - args.warmup)))  # fmt: skip
        _, indices, loss_fvu, auxk = sae(x, since_fired > args.dead_rows)
        (loss_fvu + auxk / 32).backward()
        with torch.no_grad():
            grad = sae.W_dec.grad
            grad -= (grad * sae.W_dec).sum(1, keepdim=True) * sae.W_dec
        adam.step()
        adam.zero_grad()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
            since_fired += x.shape[0]
            since_fired[indices.flatten()] = 0
    return time.perf_counter() - start, lambda x: sae(x)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=2**18, help="training rows (one pass)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per step (a multiple of 64)")
    parser.add_argument(
        "--lr", type=float, default=None, help="default: sparsify's 2e-4 / sqrt(latents / 2^14)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps")
    parser.add_argument("--dead-rows", type=int, default=100_000, help="rows without firing = dead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the fastest counts")
    parser.add_argument("--reimplementation", action="store_true", help="time the reimplementation even if "
                        "sparsify is installed")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    args.lr = args.lr or 2e-4 / math.sqrt(args.latents / 2**14)
    torch.set_num_threads(args.threads)
    data = activations(args.d_in, args.latents // 2, args.k * 3 // 4, args.tokens + 16384, args.seed)
    train, test = data[: args.tokens], data[args.tokens :]
    steps = args.tokens // args.batch_size
    use_sparsify = importlib.util.find_spec("sparsify") is not None and not args.reimplementation
    name = "sparsify" if use_sparsify else "sparsify (reimplementation)"
    times = {"ours": [], "reference": []}
    for _ in range(args.repeats):  # alternate, and keep each one's fastest run: load drift hits both alike
        seconds, other = (run_sparsify if use_sparsify else run_reimplementation)(train, args, steps)
        times["reference"].append(seconds)
        seconds, ours = run_ours(train, args, steps)
        times["ours"].append(seconds)
    our_seconds, other_seconds = min(times["ours"]), min(times["reference"])
    with torch.no_grad():
        our_fvu, other_fvu = float(fvu(test, ours(test))), float(fvu(test, other(test)))
    figures = {
        "reference": name, "d_in": args.d_in, "latents": args.latents, "k": args.k, "tokens": args.tokens,
        "steps": steps, "batch_size": args.batch_size, "threads": args.threads, "seconds": times,
        "ours_tokens_per_s": args.tokens / our_seconds, "reference_tokens_per_s": args.tokens / other_seconds,
        "speed_ratio": other_seconds / our_seconds, "ours_fvu": our_fvu, "reference_fvu": other_fvu,
        "fvu_ratio": our_fvu / other_fvu,
    }  # fmt: skip
    print(
        f"{steps} steps of {args.batch_size} rows, d_in {args.d_in}, {args.latents} latents, k {args.k}, "
        f"{args.threads} thread(s)"
    )
    print(f"{'ours':<{len(name)}} {figures['ours_tokens_per_s']:10.0f} tokens/s   held-out FVU {our_fvu:.4f}")
    print(f"{name} {figures['reference_tokens_per_s']:10.0f} tokens/s   held-out FVU {other_fvu:.4f}")
    print(
        f"ratios ours / {name}: speed {figures['speed_ratio']:.2f}x (goal >= 1), FVU {figures['fvu_ratio']:.3f} "
        "(goal <= 1.05)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
