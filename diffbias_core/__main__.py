"""diffbias: find the SAE features of a diffusion model that carry a bias, and edit them.

Usage: ``python -m diffbias_core COMMAND ...`` (``--help`` after a command lists its options).

Each command module exposes ``register(subparsers)``, which adds its sub-commands and sets
``run=function(args) -> int`` as their default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (".cli.info", ".cli.dissect", ".toy.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffbias_core", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name, __package__).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
