"""FeatureSet: validation, files, and the tie to one SAE."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from diffbias_core import FeatureSet, FormatError, SparseAutoencoder, load_features, save_features, save_sae
from diffbias_core.sae.formats import read_header


def make(classes=("male", "female"), id_lists=((4, 1, 7), (2,)), **overrides):
    fields = {
        "classes": classes,
        "ids": tuple(torch.tensor(i, dtype=torch.int64) for i in id_lists),
        "scores": tuple(torch.linspace(2, 1, len(i)) for i in id_lists),
        "sae_fingerprint": "abcdef0123456789",
        "hook": "unet.middle",
        "method": "ig",
        "provenance": {"prompts": "a photo of a {} person", "seed": "3"},
    }
    fields.update(overrides)
    return FeatureSet(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"classes": ("only",), "ids": (torch.tensor([1]),), "scores": (torch.tensor([1.0]),)},
            "at least two",
        ),
        ({"classes": ("a", "a")}, "unique"),
        ({"ids": (torch.tensor([1]),)}, "one ids and one scores tensor per class"),
        ({"ids": (torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([3]))}, "1-D int64"),
        ({"ids": (torch.tensor([[1, 2, 3]]), torch.tensor([3]))}, "1-D int64"),
        (
            {"scores": (torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([1.0]))},
            "1-D float32",
        ),
        ({"scores": (torch.tensor([1.0, 2.0]), torch.tensor([1.0]))}, "3 ids but 2 scores"),
        ({"ids": (torch.tensor([1, 1, 2]), torch.tensor([3]))}, "repeated id"),
        ({"ids": (torch.tensor([1, -1, 2]), torch.tensor([3]))}, "ids must be >= 0"),
        ({"scores": (torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([1.0]))}, "finite"),
        ({"provenance": {"seed": 3}}, "provenance keys and values must be strings"),
        ({"hook": None}, "hook must be a string"),
    ],
)
def test_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_top_and_class_index():
    fs = make()
    assert torch.equal(fs.top(0, 2), torch.tensor([4, 1]))
    assert torch.equal(fs.top(1, 5), torch.tensor([2])), "fewer when the class has fewer"
    assert fs.top(0, 0).numel() == 0
    assert fs.class_index("female") == 1
    with pytest.raises(ValueError, match=r"unknown class 'Female'.*\['male', 'female'\]"):
        fs.class_index("Female")
    with pytest.raises(ValueError, match="class_index must be in"):
        fs.top(2, 1)
    with pytest.raises(ValueError, match="k must be a non-negative integer"):
        fs.top(0, -1)


def test_lists_become_tuples_and_provenance_is_copied():
    provenance = {"a": "b"}
    fs = make(classes=["x", "y"], provenance=provenance)
    provenance["a"] = "changed"
    assert fs.classes == ("x", "y") and fs.provenance == {"a": "b"}


@settings(max_examples=20, deadline=None)
@given(
    counts=st.lists(st.integers(1, 6), min_size=2, max_size=4),  # an empty class is refused (issue 13)
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["ig", "mean-diff", "random"]),
)
def test_save_load_round_trip(counts, seed, method):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randperm(50, generator=g)[:n].tolist() for n in counts]
    fs = make(classes=tuple(f"class {i}" for i in range(len(counts))), id_lists=ids, method=method)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "features.safetensors"
        save_features(fs, path)
        loaded = load_features(path)
        _, metadata = read_header(path)
    assert loaded.classes == fs.classes and loaded.method == method and loaded.provenance == fs.provenance
    assert (loaded.sae_fingerprint, loaded.hook) == (fs.sae_fingerprint, fs.hook)
    for a, b in zip(loaded.ids + loaded.scores, fs.ids + fs.scores, strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert json.loads(metadata["classes"]) == list(fs.classes) and metadata["format"] == "diffbias.features"


def test_check_matches_names_both_fingerprints(tmp_path):
    sae = SparseAutoencoder(4, 10, 2)
    fs = make(sae_fingerprint=sae.fingerprint())
    fs.check_matches(sae)
    other = SparseAutoencoder(4, 10, 2)
    with pytest.raises(
        ValueError, match=f"fingerprint {sae.fingerprint()}.*fingerprint {other.fingerprint()}"
    ):
        fs.check_matches(other)
    small = SparseAutoencoder.from_weights(
        sae.W_enc[:5].detach(), sae.b_enc[:5].detach(), sae.W_dec.detach()[:5], sae.b_dec.detach(), 2
    )
    with pytest.raises(ValueError, match="feature id 7 is out of range for an SAE with 5 latents"):
        make(sae_fingerprint=small.fingerprint()).check_matches(small)


def test_load_errors(tmp_path):
    sae_path = tmp_path / "sae.safetensors"
    save_sae(SparseAutoencoder(4, 8, 2), sae_path)
    with pytest.raises(FormatError, match="'format' is 'diffbias.sae', expected 'diffbias.features'"):
        load_features(sae_path)
    path = tmp_path / "f.safetensors"
    metadata = {"format": "diffbias.features", "format_version": "1", "classes": '["a", "b"]',
                "sae_fingerprint": "x", "hook": "h", "method": "m"}  # fmt: skip
    save_file({"ids.0": torch.tensor([1]), "scores.0": torch.tensor([1.0])}, path, metadata=metadata)
    with pytest.raises(FormatError, match=r"f.safetensors: expected tensors .*'ids.1'.* found"):
        load_features(path)
    save_file({"ids.0": torch.tensor([1]), "scores.0": torch.tensor([1.0]), "ids.1": torch.tensor([1, 1]),
               "scores.1": torch.tensor([1.0, 0.5])}, path, metadata=metadata)  # fmt: skip
    with pytest.raises(FormatError, match="f.safetensors: FeatureSet class 'b': ids must be unique"):
        load_features(path)
    save_file({"ids.0": torch.tensor([1])}, path, metadata={**metadata, "classes": "not json"})
    with pytest.raises(FormatError, match="not valid JSON"):
        load_features(path)
    with pytest.raises(FormatError, match="arbitrary code"):
        load_features(tmp_path / "features.pt")


def test_save_accepts_rankings_that_share_storage(tmp_path):
    ranking = torch.tensor([[3, 1], [0, 2]], dtype=torch.int64)  # rows are views of one tensor
    scores = torch.tensor([[2.0, 1.0], [4.0, 3.0]])
    fs = make(id_lists=((0,), (1,)), ids=(ranking[0], ranking[1]), scores=(scores[0], scores[1]))
    save_features(fs, tmp_path / "shared.safetensors")
    loaded = load_features(tmp_path / "shared.safetensors")
    assert torch.equal(loaded.ids[1], ranking[1]) and torch.equal(loaded.scores[0], scores[0])
    assert (tmp_path / "shared.safetensors").stat().st_mode & 0o777 == 0o644
