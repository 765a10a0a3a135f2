"""``info`` command: SAE files and folders, feature sets, errors."""

import argparse
import json

import torch
from safetensors.torch import save_file

from diffbias_core import FeatureSet, SparseAutoencoder, save_features, save_sae
from diffbias_core.cli import info as cli_info


def run_info(argv):
    parser = argparse.ArgumentParser(prog="diffbias_core")
    cli_info.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["info", *argv])
    return args.run(args)


def test_native_sae_json(tmp_path, capsys):
    path = tmp_path / "sae.safetensors"
    sae = SparseAutoencoder(
        4, 12, 3, kernel_size=2, hook="unet.middle", model_family="sd15", provenance={"a": "b"}
    )
    save_sae(sae, path)
    assert run_info([str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "sae" and info["format"] == "diffbias.sae"
    assert (info["d_in"], info["num_latents"], info["k"], info["kernel_size"]) == ("4", "12", "3", "2")
    assert info["fingerprint"] == sae.fingerprint() and info["provenance"] == {"a": "b"}


def test_table_output_for_an_imported_folder(tmp_path, capsys):
    save_file({"encoder.weight": torch.randn(6, 3), "encoder.bias": torch.zeros(6), "W_dec": torch.randn(6, 3),
               "b_dec": torch.zeros(3)}, tmp_path / "sae.safetensors")  # fmt: skip
    (tmp_path / "cfg.json").write_text(
        json.dumps({"d_in": 3, "num_latents": 6, "k": 2, "activation": "topk"})
    )
    assert run_info([str(tmp_path)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["format"] == "sparsify" and lines["num_latents"] == "6" and lines["kind"] == "sae"


def test_feature_set(tmp_path, capsys):
    fs = FeatureSet(("a", "b"), (torch.tensor([3, 1]), torch.tensor([2])), (torch.tensor([2.0, 1.0]),
                    torch.tensor([1.0])), "f" * 16, "unet.middle", "ig", {"seed": "1"})  # fmt: skip
    path = tmp_path / "features.safetensors"
    save_features(fs, path)
    assert run_info([str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "features" and info["classes"] == ["a", "b"]
    assert info["features_per_class"] == {"a": 2, "b": 1} and info["sae_fingerprint"] == "f" * 16
    assert info["provenance"] == {"seed": "1"}


def test_errors_go_to_stderr_with_status_1(tmp_path, capsys):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    assert run_info([str(tmp_path / "model.ckpt")]) == 1
    assert "arbitrary code" in capsys.readouterr().err
    assert run_info([str(tmp_path / "missing.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err
