"""``python -m diffbias_core.toy train``: train the toy diffusion model and its SAE (reproduces the shipped weights).

``train`` trains the UNet, measures the bias it learned (``toy_unet.json``) and then trains the SAE on
its bottleneck; ``train-sae`` trains only the SAE, on the model already in the output folder;
``features`` attributes the colour features on that model and SAE (the shipped feature set).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from ..attribute.features import save_features
from .demo import FEATURES_FILE, DemoConfig, attribute_colours
from .dissect import SAE_FILE, ToySaeConfig, save_toy_sae, train_toy_sae
from .train import MODEL_FILE, WEIGHTS_DIR, ToyTrainConfig, load_model, train_and_save


def _train_sae(out: Path, seed: int) -> None:
    model, _ = load_model(out / MODEL_FILE)
    sae = train_toy_sae(model, ToySaeConfig(seed=seed))
    save_toy_sae(sae, out / SAE_FILE)
    print(json.dumps({"sae": str(out / SAE_FILE), **sae.provenance}, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbias_core.toy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = ToyTrainConfig()
    train = sub.add_parser("train", help="train the toy UNet, measure its bias, then train its SAE")
    train.add_argument(
        "--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})"
    )
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    train.add_argument("--skip-sae", action="store_true", help="do not train the SAE afterwards")
    sae = sub.add_parser("train-sae", help="train only the SAE, on the model in --out")
    features = sub.add_parser(
        "features",
        help="attribute the colour features on the shipped model and SAE (the shipped feature set)",
    )
    for p in (train, sae, features):
        p.add_argument(
            "--seed", type=int, default=0, help="seed of data, noise and initialisation (default 0)"
        )
        p.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (default 1: small convolutions gain little from more)")  # fmt: skip
        p.add_argument(
            "--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: the shipped weights)"
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.command == "features":
        found = attribute_colours(DemoConfig(seed=args.seed, show_progress=False))
        save_features(found, args.out / FEATURES_FILE)
        print(json.dumps({"features": str(args.out / FEATURES_FILE), "classes": found.classes,
                          "top_5": {c: found.ids[i][:5].tolist() for i, c in enumerate(found.classes)}}))  # fmt: skip
        return 0
    if args.command == "train":
        config = ToyTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
        report = train_and_save(config, args.out)
        print(json.dumps(report["learned_bias"], indent=2))
        if args.skip_sae:
            return 0
    _train_sae(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
