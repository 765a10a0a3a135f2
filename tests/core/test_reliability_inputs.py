"""Reliability on crafted input (issue 13): every bad file is a FormatError/ValueError naming the file."""

from __future__ import annotations

import argparse
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from diffbias_core import FeatureSet, SparseAutoencoder, load_features
from diffbias_core.attribute.features import check_top_k
from diffbias_core.cli import info as cli_info
from diffbias_core.cli.info import describe
from diffbias_core.dissect.activations import ShardReader
from diffbias_core.sae.formats import SAE_TENSORS, FormatError, load_sae, read_header, sae_file_metadata


def run_info(path) -> int:
    return cli_info.run(argparse.Namespace(path=str(path), json=False))


def safetensors_bytes(header: dict | str, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, str) else json.dumps(header)
    raw = raw.encode()
    return struct.pack("<Q", len(raw)) + raw + data


# ------------------------------------------------------------------------------------------------ case 12
def test_reliability_deeply_nested_header_is_a_format_error(tmp_path):
    """Case 12: a header of deeply nested JSON (a RecursionError in the parser) is a FormatError naming the file,
    for a file and for a layout folder's cfg.json."""
    path = tmp_path / "deep.safetensors"
    path.write_bytes(safetensors_bytes("[" * 100_000 + "]" * 100_000))
    with pytest.raises(FormatError, match="deep.safetensors"):
        read_header(path)
    folder = tmp_path / "layout"
    folder.mkdir()
    (folder / "sae.safetensors").write_bytes(safetensors_bytes("[" * 100_000 + "]" * 100_000))
    (folder / "cfg.json").write_text("{}")
    with pytest.raises(FormatError, match="sae.safetensors"):
        load_sae(folder)
    (folder / "cfg.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FormatError, match="cfg.json"):
        load_sae(folder)


# ------------------------------------------------------------------------------------------------ case 13
def _native(path, **metadata_changes):
    """A small native SAE file written by safetensors itself (no digests) with changed metadata."""
    sae = SparseAutoencoder(4, 8, 2)
    metadata = {**sae_file_metadata(sae), **metadata_changes}
    save_file({n: getattr(sae, n).detach().contiguous() for n in SAE_TENSORS}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"provenance": "[1]"}, "provenance"),
        ({"provenance": '{"a": 1}'}, "provenance"),
        ({"d_in": "\u00b2"}, "d_in"),
        ({"d_in": "9" * 5000}, "d_in"),
        ({"num_latents": "1" + "0" * 12}, "W_enc"),
        ({"format_version": "\u00b9"}, "format_version"),
        ({"k": "99"}, "k"),
    ],
    ids=[
        "provenance_list",
        "provenance_values",
        "superscript_d_in",
        "5000_digit_d_in",
        "huge_latents",
        "superscript_version",
        "k_above_latents",
    ],  # fmt: skip
)
def test_reliability_bad_native_metadata_is_a_format_error(tmp_path, changes, field):
    """Case 13: crafted metadata values give a FormatError naming the file and the field, never a TypeError,
    KeyError, OverflowError or an allocation."""
    path = _native(tmp_path / "bad.safetensors", **changes)
    with pytest.raises(FormatError) as caught:
        load_sae(path)
    assert str(path) in str(caught.value) and field in str(caught.value), caught.value
    with pytest.raises(FormatError):  # info reads the same fields
        describe(path)


def test_reliability_huge_integer_in_cfg_json(tmp_path):
    """Case 13: a 5000-digit integer in a layout's cfg.json (Python refuses to parse it) is a FormatError."""
    folder = tmp_path / "sparsify"
    folder.mkdir()
    sae = SparseAutoencoder(4, 8, 2)
    save_file({"encoder.weight": sae.W_enc.detach().clone(), "encoder.bias": sae.b_enc.detach().clone(),
               "W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_dec.detach().clone()},
              str(folder / "sae.safetensors"))  # fmt: skip
    (folder / "cfg.json").write_text('{"k": 2, "d_in": ' + "9" * 5000 + "}")
    with pytest.raises(FormatError, match="cfg.json"):
        load_sae(folder)


def test_reliability_symlink_loop_is_a_format_error(tmp_path):
    """Case 13: a symlink loop named like an SAE file is a FormatError naming it (not an OSError)."""
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(FormatError, match="loop.safetensors"):
        load_sae(loop)
    assert run_info(loop) == 1


@pytest.mark.parametrize(
    "header",
    [
        {"activations": "not an entry", "__metadata__": {"hook": "h"}},
        {"activations": {"shape": [2, 2], "data_offsets": [0, 16]}, "__metadata__": {"hook": "h"}},
        {
            "activations": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]},
            "__metadata__": {"hook": "h"},
        },
        {
            "activations": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 10**30]},
            "__metadata__": {"hook": "h"},
        },
    ],
    ids=["entry_not_object", "no_dtype", "overflowing_shape", "offsets_past_end"],
)
def test_reliability_malformed_shard_headers_are_value_errors(tmp_path, header):
    """Case 13: malformed shard headers give a ValueError naming the shard, never KeyError/TypeError/MemoryError."""
    path = tmp_path / "shard.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 16))
    with pytest.raises(ValueError, match="shard.safetensors"):
        ShardReader(path)


def test_reliability_shard_header_length_beyond_the_file(tmp_path):
    """Case 13: a shard whose header length field is huge is refused before any allocation."""
    path = tmp_path / "shard.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(ValueError, match="shard.safetensors"):
        ShardReader(path)


# ------------------------------------------------------------------------------------------------ case 10
def _feature_file(path, ids, scores):
    metadata = {"format": "diffbias.features", "format_version": "1", "classes": '["male", "female"]',
                "sae_fingerprint": "0" * 16, "hook": "unet.middle", "method": "ig", "provenance": "{}"}  # fmt: skip
    tensors = {}
    for i, (class_ids, class_scores) in enumerate(zip(ids, scores, strict=True)):
        tensors[f"ids.{i}"] = torch.tensor(class_ids, dtype=torch.int64)
        tensors[f"scores.{i}"] = torch.tensor(class_scores, dtype=torch.float32)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("ids", "scores", "message"),
    [
        (([1, 2], []), ([2.0, 1.0], []), "has no features"),
        (([1, 2, 3], [4, 5]), ([0.1, 0.5, 0.9], [2.0, 1.0]), "descending order"),
    ],
    ids=["empty_class", "ascending_scores"],
)
def test_reliability_feature_sets_that_do_nothing_are_refused(tmp_path, ids, scores, message):
    """Case 10: a class without features, or scores not best-first (top_k would take the worst), is a
    FormatError naming the file and the class."""
    path = _feature_file(tmp_path / "f.features.safetensors", ids, scores)
    with pytest.raises(FormatError, match=message) as caught:
        load_features(path)
    assert str(path) in str(caught.value)


def test_reliability_top_k_above_the_features_is_an_error():
    """Case 10: asking for more features than a class has is said, not silently clamped."""
    features = FeatureSet(("male", "female"), (torch.arange(5), torch.arange(5, 8)),
                          (torch.linspace(1, 0, 5), torch.linspace(1, 0, 3)), "0" * 16, "unet.middle", "ig")  # fmt: skip
    check_top_k(features, 3)
    with pytest.raises(ValueError, match="class 'female' has 3; lower top_k to 3"):
        check_top_k(features, 4)


# ------------------------------------------------------------------------------------------------ case 11
def test_reliability_folder_with_two_layouts_is_ambiguous(tmp_path):
    """Case 11: a folder holding both sparsify's and SAELens's weight files is refused, not read as sparsify."""
    sae = SparseAutoencoder(4, 8, 2)
    folder = tmp_path / "both"
    folder.mkdir()
    t = {n: getattr(sae, n).detach().clone() for n in SAE_TENSORS}
    save_file({"encoder.weight": t["W_enc"], "encoder.bias": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]},
              str(folder / "sae.safetensors"))  # fmt: skip
    save_file({**t, "W_enc": t["W_enc"].T.contiguous()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"k": 2, "architecture": "topk", "d_in": 4, "d_sae": 8}))
    for target in (folder, folder / "sae.safetensors", folder / "sae_weights.safetensors"):
        with pytest.raises(FormatError, match="holds both sae.safetensors and sae_weights.safetensors"):
            load_sae(target)
    assert run_info(folder) == 1


def _native_header(path, d_in="4", offsets=None):
    sae = SparseAutoencoder(4, 8, 2)
    header, data, start = {}, b"", 0
    for name in SAE_TENSORS:
        raw = getattr(sae, name).detach().contiguous().numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(getattr(sae, name).shape),
            "data_offsets": [start, start + len(raw)],
        }
        data, start = data + raw, start + len(raw)
    if offsets:
        for name, value in offsets.items():
            header[name]["data_offsets"] = value
    header["__metadata__"] = {**sae_file_metadata(sae), "d_in": d_in}
    path.write_bytes(safetensors_bytes(header, data))
    return path


def test_reliability_info_checks_sizes_and_offsets(tmp_path):
    """Case 11: info refuses a d_in of 10^12 that the tensors do not have, and tensors sharing bytes."""
    assert run_info(_native_header(tmp_path / "ok.safetensors")) == 0
    with pytest.raises(FormatError, match="d_in|W_enc"):
        describe(_native_header(tmp_path / "huge.safetensors", d_in=str(10**12)))
    overlapping = _native_header(tmp_path / "overlap.safetensors", offsets={"b_enc": [0, 32]})  # inside W_enc
    with pytest.raises(FormatError, match="overlaps"):
        describe(overlapping)
    with pytest.raises(FormatError, match="overlaps"):
        load_sae(overlapping)


def test_reliability_error_messages_never_quote_a_foreign_file(tmp_path):
    """Case 11: a symlink to a file that is not safetensors: the message must not contain its first 8 bytes
    (read as the header length) as a number."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    link = tmp_path / "link.safetensors"
    link.symlink_to(secret)
    leaked = str(int.from_bytes(b"root:x:0", "little"))
    with pytest.raises(FormatError) as caught:
        load_sae(link)
    assert leaked not in str(caught.value) and "link.safetensors" in str(caught.value)
