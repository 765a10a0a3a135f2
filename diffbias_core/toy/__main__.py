"""``python -m diffbias_core.toy train``: train the toy diffusion model (reproduces the shipped weights)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .train import WEIGHTS_DIR, ToyTrainConfig, train_and_save


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbias_core.toy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the toy UNet on the synthetic world and measure its bias")
    defaults = ToyTrainConfig()
    train.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    train.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of data, noise and initialisation"
    )
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    train.add_argument(
        "--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: the shipped weights)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    config = ToyTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    report = train_and_save(config, args.out)
    print(json.dumps(report["learned_bias"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
