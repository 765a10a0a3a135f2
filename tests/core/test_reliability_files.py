"""Reliability of files (issue 13): late failures checked up front, checkpoints, temporaries, digests."""

from __future__ import annotations

import argparse

import pytest
import torch

from diffbias_core import cli_dissect
from diffbias_core.activations import MemorySource, make_batch, write_shard
from diffbias_core.train import TrainConfig, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend


def cli(argv) -> int:
    parser = argparse.ArgumentParser()
    cli_dissect.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.run(args)


def rows(n: int = 512, width: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ case 2
@pytest.mark.parametrize("which", ["out", "checkpoint"])
def test_reliability_too_long_name_fails_before_training(tmp_path, which):
    """Case 2: a name that passes as a file name but not as the temporary one (or the checkpoint's state
    sidecar) is refused before the first step, not after the whole run."""
    steps = []
    long_name = "a" * 235 + ".safetensors"  # 247 bytes: fits 255, its temporary name does not
    out = tmp_path / (long_name if which == "out" else "sae.safetensors")
    checkpoint = tmp_path / (long_name if which == "checkpoint" else "ckpt.safetensors")
    source = MemorySource(make_batch(rows(), 0), hook="test.hook")
    with pytest.raises(ValueError, match="exceeds the 255-byte limit"):
        train_sae(source, TrainConfig(num_latents=16, k=2, batch_size=32, warmup_steps=0), out=out,
                  checkpoint=checkpoint, progress=lambda stats: steps.append(stats.step))  # fmt: skip
    assert steps == []
    assert list(tmp_path.iterdir()) == []


def test_reliability_attribute_cli_checks_its_output_name_first(tmp_path, capsys):
    """Case 2: attribute refuses an unwritable --out before loading anything."""
    shard = tmp_path / "acts.safetensors"
    batch = make_batch(rows(8), 0, label=torch.tensor([0, 1] * 4), sample=torch.arange(8) // 2)
    write_shard(shard, batch, hook="test.hook", classes=("a", "b"))
    assert cli(["attribute", "--sae", tmp_path / "missing_sae.safetensors", shard,
                "--out", tmp_path / ("f" * 240 + ".safetensors")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "exceeds the 255-byte limit" in err and "missing_sae" not in err
