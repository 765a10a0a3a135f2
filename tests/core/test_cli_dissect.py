import argparse

import pytest
import torch

from diffbias_core.attribute.features import load_features
from diffbias_core.cli import dissect as cli_dissect
from diffbias_core.dissect.activations import write_shard
from diffbias_core.sae.formats import load_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend


def _run(argv):
    parser = argparse.ArgumentParser()
    cli_dissect.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.run(args)


@pytest.fixture
def shards(tmp_path, planted):
    problem = planted.planted_maps(7, samples=60, steps=2, noise=0.02)
    batch = problem.batch
    paths = []
    for i, half in enumerate((batch.sample < 30, batch.sample >= 30)):  # two shards, pairs kept together
        paths.append(tmp_path / f"acts{i}.safetensors")
        write_shard(paths[-1], batch.select(half), hook="toy.mid", classes=problem.classes)
    return problem, paths


def test_train_then_attribute_end_to_end(tmp_path, shards, capsys):
    problem, paths = shards
    sae_path = tmp_path / "sae.safetensors"
    assert _run(["train-sae", *paths, "--latents", 24, "--k", 4, "--epochs", 8, "--batch-size", 128,
                 "--lr", 1e-2, "--warmup-steps", 5, "--out", sae_path, "--checkpoint-every", 10]) == 0  # fmt: skip
    out = capsys.readouterr()
    assert "trained" in out.out and "FVU" in out.out and "train fvu" in out.err  # summary and progress bar
    sae = load_sae(sae_path)
    assert sae.hook == "toy.mid" and sae.num_latents == 24 and sae.k == 4
    assert (tmp_path / "sae.ckpt.safetensors").exists() and (tmp_path / "sae.ckpt.state.safetensors").exists()
    feats = tmp_path / "features.safetensors"
    assert (
        _run(["attribute", "--sae", sae_path, *paths, "--top-k", 3, "--out", feats, "--probe-iterations", 30])
        == 0
    )
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "class0:" in out
    accuracy = [float(line.split()[1]) for line in out.splitlines() if line[:4].strip().isdigit()]
    assert len(accuracy) == 2 and min(accuracy) >= 0.9
    features = load_features(feats)
    features.check_matches(sae)
    assert (
        features.method == "ig"
        and features.classes == problem.classes
        and all(len(i) == 3 for i in features.ids)
    )
    assert features.provenance["shards"] == "acts0.safetensors,acts1.safetensors"
    for method in ("mean-diff", "random"):
        assert (
            _run(
                [
                    "attribute",
                    "--sae",
                    sae_path,
                    *paths,
                    "--method",
                    method,
                    "--out",
                    tmp_path / f"{method}.safetensors",
                ]
            )
            == 0
        )
        assert load_features(tmp_path / f"{method}.safetensors").method == method


def test_steps_and_resume(tmp_path, shards, capsys):
    _, paths = shards
    out = tmp_path / "s.safetensors"
    common = ["--latents", 16, "--k", 2, "--batch-size", 64, "--out", out]
    assert _run(["train-sae", *paths, *common, "--steps", 30]) == 0
    assert load_sae(out).provenance["steps"] == "30"
    assert _run(["train-sae", *paths, *common, "--steps", 45, "--resume"]) == 0
    assert load_sae(out).provenance["steps"] == "45"
    assert "trained 45 steps" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path, shards, capsys):
    _, paths = shards
    other = tmp_path / "other.safetensors"
    from diffbias_core.dissect.activations import make_batch

    write_shard(other, make_batch(torch.randn(3, 5), 0), hook="toy.mid")
    assert (
        _run(["train-sae", paths[0], other, "--latents", 8, "--k", 2, "--out", tmp_path / "x.safetensors"])
        == 2
    )
    assert "shards disagree on row shape" in capsys.readouterr().err
    assert _run(["train-sae", paths[0], "--latents", 8, "--k", 9, "--out", tmp_path / "x.safetensors"]) == 2
    assert "k must be <= num_latents" in capsys.readouterr().err
    assert (
        _run(
            [
                "attribute",
                "--sae",
                tmp_path / "missing.safetensors",
                *paths,
                "--out",
                tmp_path / "f.safetensors",
            ]
        )
        == 2
    )
    assert "missing.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "f.safetensors").exists()
