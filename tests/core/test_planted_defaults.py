"""``train-sae`` with its defaults trains an SAE whose features attribution can find (the planted problem).

12,000 SAE rows of width 64 (750 paired samples x 2 steps x 2 classes x 4 positions), 64 unit atoms: 4 per
class plus 56 background atoms. One pass at the former defaults (batch 4096) was 3 optimizer steps and left
a random dictionary in which no class atom could be found.
"""

import argparse

import pytest
import torch

from diffbias_core.attribute.features import load_features
from diffbias_core.cli import dissect as cli_dissect
from diffbias_core.dissect.activations import write_shard
from diffbias_core.sae.formats import load_sae

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _run(argv) -> int:
    parser = argparse.ArgumentParser()
    cli_dissect.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.run(args)


def precision(features, sae, problem) -> float:
    """Share of the listed features that are a planted atom of their class: the decoder row's closest
    atom (cosine) belongs to the class and the cosine is at least 0.5 (a random unit row of width 64 is
    at most ~0.4 from all 64 atoms)."""
    cosine = sae.w_dec_flat.detach() @ problem.dictionary.T  # (latents, atoms)
    hits = 0
    for c, atoms in enumerate(problem.class_atoms):
        best = cosine[features.ids[c]].max(1)
        hits += int((torch.isin(best.indices, atoms) & (best.values >= 0.5)).sum())
    return hits / sum(len(ids) for ids in features.ids)


def test_train_sae_defaults_recover_the_planted_class_features(planted, tmp_path, capsys):
    problem = planted.planted_maps(11, width=64, atoms=64, classes=2, per_class=4, background_k=4, samples=750,
                                   steps=2, size=2, noise=0.02, presence=0.3)  # fmt: skip
    shard, sae_path = tmp_path / "acts.safetensors", tmp_path / "sae.safetensors"
    write_shard(shard, problem.batch, hook="toy.mid", classes=problem.classes)
    assert problem.batch.num_rows * 4 == 12_000
    assert _run(["train-sae", shard, "--latents", 128, "--k", 8, "--out", sae_path]) == 0
    out = capsys.readouterr()
    assert "verdict: trained" in out.out and "under-trained" not in out.err, out.out
    sae = load_sae(sae_path)
    steps = int(sae.provenance["steps"])
    assert steps >= 2000 and "held-out FVU converged" in out.out, out.out
    scores = {}
    for method in ("ig", "random"):
        path = tmp_path / f"{method}.safetensors"
        assert (
            _run(["attribute", "--sae", sae_path, shard, "--method", method, "--top-k", 4, "--out", path])
            == 0
        )
        scores[method] = precision(load_features(path), sae, problem)
    assert scores["ig"] >= 0.85 and scores["random"] <= 0.4, scores


def test_train_sae_former_defaults_are_reported_under_trained(planted, tmp_path, capsys):
    """One pass at batch 4096 (what the defaults were): the report says so, and why."""
    problem = planted.planted_maps(11, width=64, atoms=64, classes=2, per_class=4, background_k=4, samples=750,
                                   steps=2, size=2, noise=0.02, presence=0.3)  # fmt: skip
    shard = tmp_path / "acts.safetensors"
    write_shard(shard, problem.batch, hook="toy.mid", classes=problem.classes)
    argv = ["train-sae", shard, "--latents", 128, "--k", 8, "--epochs", 1, "--batch-size", 4096,
            "--warmup-steps", 1000, "--out", tmp_path / "sae.safetensors"]  # fmt: skip
    assert _run(argv) == 0
    out = capsys.readouterr()
    assert "verdict: under-trained" in out.out and "warning: the SAE is under-trained" in out.err
    assert "3 optimizer steps, fewer than the 2000 needed" in out.err and "above 0.5" in out.err, out.err
