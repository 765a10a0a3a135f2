"""``python -m diffbias_core demo``: the whole pipeline on the embedded toy model, on CPU."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from . import world as W

DEFAULT_OUT = Path("diffbias_out")


def parse_bias(text: str) -> tuple[tuple[float, ...], ...]:
    """``--bias``: a majority probability for every shape ("0.95"), or full rows per shape
    ("circle=0.9/0.05/0.05,square=0.1/0.1/0.8,triangle=0.2/0.6/0.2", colours in the order red/green/blue;
    shapes not named keep the shipped skew)."""
    text = text.strip()
    try:
        return W.skew_from_majority(float(text))
    except ValueError as error:
        if "bias" in str(error):
            raise argparse.ArgumentTypeError(str(error)) from None
    rows = {s: list(r) for s, r in zip(W.SHAPES, W.DEFAULT_SKEW, strict=True)}
    for part in text.split(","):
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in rows:
            raise argparse.ArgumentTypeError(
                f"--bias {text!r}: unknown shape {name!r}; shapes are {list(W.SHAPES)}"
            )
        try:
            probs = [float(v) for v in values.split("/")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--bias {text!r}: {values!r} is not numbers separated by '/'"
            ) from None
        if len(probs) != len(W.COLOURS):
            raise argparse.ArgumentTypeError(
                f"--bias {text!r}: {name} needs {len(W.COLOURS)} probabilities ({'/'.join(W.COLOURS)}), got {len(probs)}"
            )
        rows[name] = probs
    skew = tuple(tuple(rows[s]) for s in W.SHAPES)
    try:
        W.WorldConfig(skew=skew)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--bias {text!r}: {error}") from None
    return skew


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo",
        help="run dissect, attribute, intervene and measure on the embedded toy model (CPU, a few minutes)",
        description=(__doc__ or "").splitlines()[0],
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of noise, class assignment and controls (default 0)"
    )
    parser.add_argument(
        "--samples", type=int, default=500, help="images per shape for every run (default 500)"
    )
    parser.add_argument("--steps", type=int, default=10, help="DDIM sampling steps (default 10)")
    parser.add_argument(
        "--pairs",
        type=int,
        default=48,
        help="attribution: noises per shape, each generated with every colour named (default 48)",
    )
    parser.add_argument("--bias", type=parse_bias, default=None, metavar="SKEW",
                        help="a new colour skew, e.g. 0.95 or 'circle=0.9/0.05/0.05': regenerates the world, "
                             "fine-tunes the model and trains a new SAE first (several more minutes)")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for the pictures and the report"
    )
    parser.add_argument("--json", type=Path, default=None, help="report path (default: OUT/report.json)")
    parser.add_argument("--train-sae", action="store_true", help="train a new SAE instead of the shipped one")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the toy's small convolutions gain little from more, "
                             "and several threads slow down badly on a busy machine)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def _summary(report: dict[str, Any]) -> str:
    rows = [("", "FD", "shape acc", "hit rate", "twin mask kept")]
    rows.append(("before", report["fd_before"], report["shape_accuracy_before"], "", ""))
    rows.append(("after (SAE edit)", report["fd_after"], report["shape_accuracy_after"],
                 report["assignment_hit_rate"], report["twin_mask_kept"]))  # fmt: skip
    for name, figures in report["controls"].items():
        rows.append((f"control: {name}", figures["fd_after"], figures["shape_accuracy_after"],
                     figures["assignment_hit_rate"], figures["twin_mask_kept"]))  # fmt: skip
    lines = [f"{r[0]:<28}" + "".join(f"{str(v):>16}" for v in r[1:]) for r in rows]
    lines.append("")
    lines.append(f"{'per shape':<28}{'FD before':>16}{'FD after':>16}{'hit rate':>16}{'twin kept':>16}")
    for shape, figures in report["per_shape"].items():
        lines.append(f"{shape:<28}{figures['fd_before']:>16}{figures['fd_after']:>16}"
                     f"{figures['assignment_hit_rate']:>16}{figures['twin_mask_kept']:>16}")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed options; prints a summary table and where the outputs are."""
    from .demo import DemoConfig, run_demo
    from .pictures import save_charts, save_grid
    from .train import write_json

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    config = DemoConfig(seed=args.seed, samples=args.samples, steps=args.steps, pairs=args.pairs, skew=args.bias,
                        train_sae=args.train_sae, show_progress=not args.quiet)  # fmt: skip
    result = run_demo(config)
    out: Path = args.out
    report_path = args.json or out / "report.json"
    write_json(result.report, report_path)
    drawn = save_grid(result.images, result.shape, out / "twins.png")
    drawn = save_charts(result.report, out / "charts.png") and drawn
    print(_summary(result.report))
    pictures = (
        f"{out / 'twins.png'}, {out / 'charts.png'}" if drawn else "not drawn (Pillow is not installed)"
    )
    print(f"\nreport: {report_path}\npictures: {pictures}")
    print(f"seconds: {json.dumps(result.report['seconds'])}")
    return 0


__all__ = ["parse_bias", "register", "run"]
