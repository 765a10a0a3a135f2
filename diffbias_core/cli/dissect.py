"""``python -m diffbias_core train-sae|attribute``: dissect and attribute from activation shards.

    python -m diffbias_core train-sae SHARD... --latents 4096 --k 32 --out sae.safetensors
    python -m diffbias_core attribute --sae sae.safetensors SHARD... --out features.safetensors

``train-sae`` runs data-parallel under ``torchrun --nproc-per-node N -m diffbias_core train-sae ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from ..attribute.attribution import AttributionConfig, attribute
from ..attribute.budget import attribution_memory
from ..attribute.features import feature_warnings, save_features
from ..attribute.probes import ProbeConfig, fit_probes
from ..base.memory import check_fits, format_bytes
from ..base.progress import Progress
from ..dissect import distributed as ddp
from ..dissect.activations import ShardSet
from ..dissect.spool import StepShards
from ..dissect.train import TrainConfig, config_for_rows, rows_per_activation, train_sae
from ..dissect.train_check import steps_per_pass
from ..dissect.train_state import state_path
from ..sae.formats import FormatError, check_writable_name, load_sae

CHECKPOINT_EVERY = 1000
"""Default steps between resumable checkpoints of ``train-sae``: a killed run loses at most this many."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train-sae`` and ``attribute`` commands."""
    train = subparsers.add_parser("train-sae", help="train a TopK SAE on activation shards",
                                  description=train_command.__doc__)  # fmt: skip
    train.add_argument("shards", nargs="+", type=Path, metavar="SHARD", help="activation shard files")
    train.add_argument("--latents", type=int, required=True, help="number of SAE latents")
    train.add_argument("--k", type=int, required=True, help="active latents per row")
    train.add_argument("--out", type=Path, required=True, help="SAE file to write (the best weights)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="exactly this many optimizer steps (default: automatic)")
    length.add_argument("--epochs", type=int, help="this many passes over the shards (default: automatic)")
    train.add_argument("--min-steps", type=int, default=2000,
                       help="automatic length: at least this many steps, then until the held-out FVU stops "
                       "improving (default 2000); fewer steps are reported under-trained")  # fmt: skip
    train.add_argument("--holdout", type=float, default=0.1,
                       help="share of sample ids held out to measure FVU (default 0.1)")  # fmt: skip
    train.add_argument("--batch-size", type=int,
                       help="rows per optimizer step (default: rows per pass / 32, within 256..4096)")  # fmt: skip
    train.add_argument("--lr", type=float, help="learning rate (default 2e-4 / sqrt(latents / 2^14))")
    train.add_argument("--warmup-steps", type=int,
                       help="learning-rate warm-up steps (default min(1000, min-steps / 10))")  # fmt: skip
    train.add_argument("--auxk-alpha", type=float, default=1 / 32, help="AuxK loss weight (0 disables it)")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights and the shuffling")
    train.add_argument(
        "--kernel-size", type=int, default=1, help="1: per-position codes; K: one code per KxK map"
    )
    train.add_argument("--model-family", default="unknown", help="model family recorded in the SAE file")
    train.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    train.add_argument("--checkpoint", type=Path, help="resumable checkpoint (default: OUT with .ckpt)")
    train.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                       help=f"steps between checkpoints (default {CHECKPOINT_EVERY}; 0: at the end only)")  # fmt: skip
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    train.set_defaults(run=train_command)

    attr = subparsers.add_parser("attribute", help="rank the SAE features of each class of labelled shards",
                                 description=attribute_command.__doc__)  # fmt: skip
    attr.add_argument(
        "shards", nargs="+", type=Path, metavar="SHARD", help="labelled, paired activation shards"
    )
    attr.add_argument("--sae", type=Path, required=True, help="SAE file or folder")
    attr.add_argument("--out", type=Path, required=True, help="feature-set file to write")
    attr.add_argument(
        "--method", choices=("ig", "mean-diff", "random"), default="ig", help="ranking (default ig)"
    )
    attr.add_argument("--baseline", choices=("paired", "zero"), default="paired", help="IG baseline")
    attr.add_argument("--top-k", type=int, default=100, help="features kept per class (default 100)")
    attr.add_argument("--points", type=int, default=16, help="IG interpolation points (default 16)")
    attr.add_argument(
        "--temperature", type=float, default=1000.0, help="probe softmax temperature (default 1000)"
    )
    attr.add_argument("--probe-iterations", type=int, default=100, help="L-BFGS iterations per probe")
    attr.add_argument(
        "--holdout", type=float, default=0.25, help="share of samples held out for probe accuracy"
    )
    attr.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the random control")
    attr.set_defaults(run=attribute_command)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _train_config(args: argparse.Namespace, rows: int, world: int) -> TrainConfig:
    """The :class:`TrainConfig` of ``train-sae``'s options for ``rows`` SAE rows per pass."""
    fields = {"lr": args.lr, "auxk_alpha": args.auxk_alpha, "seed": args.seed, "holdout": args.holdout,
              "checkpoint_every": args.checkpoint_every, "min_steps": args.min_steps,
              "batch_size": args.batch_size}  # fmt: skip
    if args.warmup_steps is not None:
        fields["warmup_steps"] = args.warmup_steps
    if args.epochs:
        fields["epochs"] = args.epochs
    config = config_for_rows(args.latents, args.k, rows, **fields)
    if args.steps:  # enough passes over the training rows to reach the step count
        train_rows = max(1.0, rows * (1 - args.holdout))
        passes = math.ceil(args.steps * config.batch_size * world / train_rows) + 1
        config = dataclasses.replace(config, epochs=passes, max_steps=args.steps)
    return config


def _expected_steps(config: TrainConfig, rows: int, world: int) -> int:
    """The progress bar's length: max_steps, the passes' steps, or min_steps (the automatic length's least)."""
    if config.max_steps:
        return config.max_steps
    if config.epochs:
        return config.epochs * steps_per_pass(rows * (1 - config.holdout), config.batch_size, world)
    return config.min_steps


def _print_result(result, args: argparse.Namespace, checkpoint: Path, world: int) -> None:
    s = result.stats
    print(
        f"trained {s.step} steps on {s.rows} rows ({s.skipped} non-finite rows skipped) in {world} "
        f"process(es): running training FVU {s.fvu:.4f} (best {s.best_fvu:.4f}), L0 {s.l0:.1f}, dead {100 * s.dead_fraction:.1f}%"
    )
    print(result.check.summary())
    print(f"wrote {args.out} (checkpoint {checkpoint}, state {state_path(checkpoint).name})")
    if result.check.verdict != "trained":
        print(f"warning: the SAE is {result.check.verdict}: {'; '.join(result.check.reasons)}",
              file=sys.stderr)  # fmt: skip


def train_command(args: argparse.Namespace) -> int:
    """Train a TopK sparse autoencoder on the activations of one hook point.

    By default the length is automatic: passes over the shards until at least --min-steps optimizer
    steps, then until the FVU on held-out rows stops improving. The report ends with a verdict.
    """
    try:
        shards = ShardSet(args.shards)
        ddp.init_from_env()
        rank, world = ddp.world()
        rows = shards.num_rows * rows_per_activation(shards.row_shape, args.kernel_size)  # SAE rows per pass
        config = _train_config(args, rows, world)
    except (ValueError, OSError) as error:
        return _fail(str(error))
    checkpoint = args.checkpoint or args.out.with_name(
        f"{args.out.stem}.ckpt{args.out.suffix or '.safetensors'}"
    )
    if args.resume and not state_path(checkpoint).exists():
        return _fail(f"--resume: there is no checkpoint {checkpoint} to resume from (it is written every "
                     f"{args.checkpoint_every} steps and at the end); run without --resume to start from scratch")  # fmt: skip
    with Progress(_expected_steps(config, rows, world), "train-sae", enabled=rank == 0) as bar:

        def progress(stats) -> None:
            bar.desc = f"train fvu {stats.fvu:.4f}"
            if stats.step >= bar.total:  # the automatic length ran past its estimate: extend it
                bar.total = stats.step + max(1, config.min_steps // 2)
            bar.update(stats.step - bar.done)

        try:
            result = train_sae(shards, config, out=args.out, checkpoint=checkpoint, resume=args.resume,
                               sae_options={"kernel_size": args.kernel_size, "model_family": args.model_family,
                                            "device": args.device}, progress=progress)  # fmt: skip
        except KeyboardInterrupt:
            print(f"\ninterrupted: best SAE so far in {args.out}, resume with --resume from {checkpoint}",
                  file=sys.stderr)  # fmt: skip
            return 130
        except (ValueError, OSError) as error:
            return _fail(str(error))
    if rank == 0:
        _print_result(result, args, checkpoint, world)
    return 0


def _check_attribution_memory(
    sae, shards: StepShards, config: AttributionConfig, probes: ProbeConfig | None
) -> None:
    """Print the RAM the run will need at its peak (one step at a time); MemoryError when it is not there."""
    per_step = int(shards.column("step").unique(return_counts=True)[1].max())
    need = attribution_memory(sae, shards.row_shape, images=per_step, steps=len(shards.steps()),
                              classes=len(shards.classes), attribution=config, probes=probes,
                              recorded_itemsize=shards.row_bytes // max(1, math.prod(shards.row_shape)))  # fmt: skip
    phase = max(need.phases, key=need.phases.get)
    print(f"memory: {format_bytes(need.ram)} of RAM at most ({phase}; {per_step} activations per step, "
          f"{format_bytes(need.step)} as float32)")  # fmt: skip
    check_fits(need.ram, f"attributing {shards.num_rows} activations of {len(shards.steps())} steps")


def attribute_command(args: argparse.Namespace) -> int:
    """Fit per-step probes on labelled shards and rank the SAE's features per class."""
    try:
        check_writable_name(args.out)
        shards = StepShards(args.shards)  # one step's activations in memory at a time
        sae = load_sae(args.sae)
        config = AttributionConfig(method=args.method, baseline=args.baseline, top_k=args.top_k,
                                   points=args.points, temperature=args.temperature, seed=args.seed)  # fmt: skip
        probe_config = ProbeConfig(iterations=args.probe_iterations, holdout=args.holdout, seed=args.seed)
        _check_attribution_memory(sae, shards, config, probe_config if config.method == "ig" else None)
        probes = None
        if config.method == "ig":
            steps = shards.steps()
            with Progress(len(steps), "fit probes") as bar:
                probes = fit_probes(shards, probe_config,
                                    progress=lambda done, total: bar.update(done - bar.done))  # fmt: skip
            print("step  held-out accuracy  train accuracy")
            for step, acc, train_acc in zip(probes.steps.tolist(), probes.accuracy.tolist(),
                                            probes.train_accuracy.tolist(), strict=True):  # fmt: skip
                print(f"{step:4d}  {acc:17.3f}  {train_acc:14.3f}")
        with Progress(1, f"attribute ({config.method})") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.done)

            features = attribute(sae, shards, config, probes, progress=progress)
        features = dataclasses.replace(
            features,
            provenance={
                **features.provenance,
                "sae": args.sae.name,
                "shards": ",".join(p.name for p in args.shards),
            },
        )
        save_features(features, args.out)
    except (ValueError, OSError, FormatError, MemoryError) as error:
        return _fail(str(error))
    for name, ids in zip(features.classes, features.ids, strict=True):
        print(f"{name}: {', '.join(map(str, ids[:10].tolist()))}{' ...' if len(ids) > 10 else ''}")
    if "probe_check" in features.provenance:
        print(f"probes: {features.provenance['probe_check']}")
    for text in feature_warnings(features):
        print(f"warning: {text}", file=sys.stderr)
    print(f"wrote {args.out} ({features.method}, {len(features.ids[0])} features per class)")
    return 0


__all__ = ["attribute_command", "register", "train_command"]
