"""SAE files: native round trips, imports of the published layouts (fixtures written here), refused and damaged files."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from diffbias_core import FormatError, SparseAutoencoder, load_sae, sae_metadata, save_sae
from diffbias_core.sae.formats import read_header, write_safetensors

SIZES = st.tuples(st.integers(2, 6), st.integers(2, 12), st.integers(0, 2**16))  # d_in, latents, seed


def rand(g, *shape):
    return torch.randn(*shape, generator=g) * 0.5


def dense_topk(pre, k, dim=-1):
    """Keep the k largest entries of ``pre`` along ``dim`` (ReLU already applied), zero the rest."""
    top = pre.topk(k, dim=dim)
    return torch.zeros_like(pre).scatter(dim, top.indices, top.values)


def our_dense(sae, x):
    code = sae.encode(x)
    return torch.zeros(*x.shape[:-1], sae.num_latents).scatter(-1, code.indices, code.values.float())


# ----------------------------------------------------------------------------------------------- native
@settings(max_examples=15, deadline=None)
@given(sizes=SIZES, kernel=st.sampled_from([1, 2, 3]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_native_round_trip(sizes, kernel, dtype):
    d_in, latents, seed = sizes
    sae = SparseAutoencoder(d_in, latents, 1 + seed % latents, kernel_size=kernel, hook="dit.single.7",
                            model_family="flux", provenance={"steps": "12", "note": "é"}, dtype=dtype)  # fmt: skip
    with torch.no_grad():
        sae.b_enc.copy_(rand(torch.Generator().manual_seed(seed), latents))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sae.safetensors"
        save_sae(sae, path)
        loaded = load_sae(path)
        meta = sae_metadata(path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)) and getattr(loaded, name).dtype == dtype
    assert (loaded.k, loaded.kernel_size, loaded.hook, loaded.model_family) == (
        sae.k,
        kernel,
        "dit.single.7",
        "flux",
    )
    assert loaded.provenance == {"steps": "12", "note": "é"}
    assert loaded.fingerprint() == sae.fingerprint() == meta["fingerprint"]
    assert (
        meta["format"] == "diffbias.sae" and meta["d_in"] == str(d_in) and meta["kernel_size"] == str(kernel)
    )
    assert json.loads(meta["provenance"]) == {"steps": "12", "note": "é"}


def test_load_sae_overrides_and_conversion(tmp_path):
    sae = SparseAutoencoder(4, 8, 2)
    save_sae(sae, tmp_path / "a.safetensors")
    loaded = load_sae(
        tmp_path / "a.safetensors", dtype=torch.bfloat16, hook="unet.output.1", model_family="sd15"
    )
    assert loaded.dtype == torch.bfloat16 and (loaded.hook, loaded.model_family) == ("unet.output.1", "sd15")


# ----------------------------------------------------------------------------------------------- sparsify
def write_sparsify(folder, d_in, latents, k, g, cfg=None):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": rand(g, latents, d_in), "encoder.bias": rand(g, latents),
               "W_dec": rand(g, latents, d_in), "b_dec": rand(g, d_in)}  # fmt: skip
    save_file(tensors, folder / "sae.safetensors")
    config = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": latents,
              "k": k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in, **(cfg or {})}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(config))
    return tensors


def sparsify_reference(t, k, x):
    pre = F.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    z = dense_topk(pre, k)
    return z, z @ t["W_dec"] + t["b_dec"]


@settings(max_examples=10, deadline=None)
@given(sizes=SIZES)
def test_sparsify_import_matches_reference(sizes):
    d_in, latents, seed = sizes
    g = torch.Generator().manual_seed(seed)
    k = 1 + seed % latents
    x = rand(g, 7, d_in) * 4
    with tempfile.TemporaryDirectory() as folder:
        layer = Path(folder) / "unet.up_blocks.1.attentions.1"
        t = write_sparsify(layer, d_in, latents, k, g)
        sae = load_sae(layer)
        assert load_sae(layer / "sae.safetensors").fingerprint() == sae.fingerprint(), (
            "weight file loads its folder"
        )
        meta = sae_metadata(layer)
    z, out = sparsify_reference(t, k, x)
    torch.testing.assert_close(our_dense(sae, x), z)
    torch.testing.assert_close(sae(x), out)
    assert sae.provenance["imported_from"] == "sparsify"
    assert sae.provenance["source_hook"] == "unet.up_blocks.1.attentions.1"
    assert meta["format"] == "sparsify" and meta["num_latents"] == str(latents) and meta["k"] == str(k)
    assert "fingerprint" not in meta and "format_version" not in meta


def test_sparsify_num_latents_zero_uses_expansion(tmp_path):
    g = torch.Generator().manual_seed(0)
    write_sparsify(tmp_path, 3, 6, 2, g, {"num_latents": 0, "expansion_factor": 2})
    assert load_sae(tmp_path).num_latents == 6
    write_sparsify(tmp_path, 3, 6, 2, g, {"num_latents": 0, "expansion_factor": 4})
    with pytest.raises(FormatError, match=r"12 latents.*\(6, 3\)"):
        load_sae(tmp_path)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [({"activation": "groupmax"}, "activation 'groupmax' is not supported"),
     ({"transcode": True}, "transcoder"),
     ({"d_in": 5}, "d_in 5")],
)  # fmt: skip
def test_sparsify_refusals(tmp_path, cfg, message):
    write_sparsify(tmp_path, 3, 6, 2, torch.Generator().manual_seed(0), cfg)
    with pytest.raises(FormatError, match=message):
        load_sae(tmp_path)


# ----------------------------------------------------------------------------------------------- SAELens
def write_saelens(folder, d_in, latents, g, cfg, scaling=None):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": rand(g, d_in, latents), "b_enc": rand(g, latents), "W_dec": rand(g, latents, d_in),
               "b_dec": rand(g, d_in)}  # fmt: skip
    if scaling is not None:
        tensors["scaling_factor"] = scaling
    save_file(tensors, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": latents, "dtype": "float32", **cfg}))
    return tensors


def saelens_reference(t, cfg, k, x):
    """SAELens TopKSAE: topk of the pre-activation, ReLU on the kept values, then decode."""
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    hidden = sae_in @ t["W_enc"] + t["b_enc"]
    norm = t["W_dec"].norm(dim=-1)
    if cfg.get("rescale_acts_by_decoder_norm"):
        hidden = hidden * norm
    top = hidden.topk(k, dim=-1)
    acts = torch.zeros_like(hidden).scatter(-1, top.indices, top.values.relu())
    decode = acts / norm if cfg.get("rescale_acts_by_decoder_norm") else acts
    if "scaling_factor" in t:
        decode = decode * t["scaling_factor"]
    return acts, decode @ t["W_dec"] + t["b_dec"]


SAELENS_CONFIGS = [
    {"architecture": "topk", "k": 3, "metadata": {"hook_name": "blocks.2.hook_resid_post", "model_name": "m"}},
    {"architecture": "topk", "k": 2, "apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True},
    {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
     "hook_name": "blocks.0.hook_mlp_out", "normalize_activations": False},
    {"architecture": "standard", "activation_fn": "topk", "activation_fn_kwargs": {"k": 1}, "apply_b_dec_to_input": False},
]  # fmt: skip


@settings(max_examples=12, deadline=None)
@given(sizes=SIZES, cfg=st.sampled_from(SAELENS_CONFIGS), scaled=st.booleans())
def test_saelens_import_matches_reference(sizes, cfg, scaled):
    d_in, latents, seed = sizes
    k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
    latents = max(latents, k)
    g = torch.Generator().manual_seed(seed)
    scaling = rand(g, latents).abs() + 0.5 if scaled else None
    x = rand(g, 6, d_in) * 4
    with tempfile.TemporaryDirectory() as folder:
        t = write_saelens(Path(folder), d_in, latents, g, cfg, scaling)
        sae = load_sae(folder)
    z, out = saelens_reference(t, cfg, k, x)
    torch.testing.assert_close(sae(x), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_dense(sae, x), z, atol=1e-5, rtol=1e-5)
    assert sae.k == k and sae.provenance["imported_from"] == "saelens"
    hook = cfg.get("hook_name") or cfg.get("metadata", {}).get("hook_name")
    assert sae.provenance.get("source_hook_name") == hook


@pytest.mark.parametrize(
    ("cfg", "message"),
    [({"architecture": "standard"}, "architecture 'standard' .*not a TopK SAE"),
     ({"architecture": "jumprelu"}, "not a TopK SAE"),
     ({"architecture": "batchtopk", "k": 2}, "not a TopK SAE"),
     ({"architecture": "topk"}, "'k' must be a non-negative integer, found None"),
     ({"architecture": "topk", "k": 2, "normalize_activations": "expected_average_only_in"}, "only 'none'")],
)  # fmt: skip
def test_saelens_refusals(tmp_path, cfg, message):
    write_saelens(tmp_path, 3, 6, torch.Generator().manual_seed(0), cfg)
    with pytest.raises(FormatError, match=message):
        load_sae(tmp_path)


# ----------------------------------------------------------------------------------------------- DiffLens
def write_difflens(folder, d_in, latents, k, kernel, g):
    folder.mkdir(parents=True, exist_ok=True)
    decoder = rand(g, d_in, latents, 1, 1) if kernel == 1 else rand(g, latents, d_in, kernel, kernel)
    tensors = {"encoder.weight": rand(g, latents, d_in, kernel, kernel), "encoder.bias": rand(g, latents),
               "decoder.weight": decoder, "decoder.bias": rand(g, d_in)}  # fmt: skip
    save_file(tensors, folder / "sae.safetensors")
    cfg = {"expansion_factor": latents // d_in, "normalize_decoder": True, "num_latents": latents, "k": k,
           "multi_topk": False, "d_in": d_in}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return tensors


def difflens_reference(t, k, kernel, h):
    """DiffLens training code: Conv2d encoder on h (no bias subtraction), TopK over channels, conv decoder."""
    pre = F.relu(F.conv2d(h, t["encoder.weight"], t["encoder.bias"]))  # (B, L, H', W')
    z = dense_topk(pre, k, dim=1)
    if kernel == 1:
        return z, F.conv2d(z, t["decoder.weight"], t["decoder.bias"])
    return z, F.conv_transpose2d(z, t["decoder.weight"], t["decoder.bias"])


@settings(max_examples=12, deadline=None)
@given(sizes=SIZES, kernel=st.sampled_from([1, 2, 4]))
def test_difflens_import_matches_reference(sizes, kernel):
    d_in, latents, seed = sizes
    g = torch.Generator().manual_seed(seed)
    k = 1 + seed % latents
    size = kernel if kernel > 1 else 3
    h = rand(g, 2, d_in, size, size) * 4
    with tempfile.TemporaryDirectory() as folder:
        t = write_difflens(Path(folder), d_in, latents, k, kernel, g)
        sae = load_sae(folder)
        meta = sae_metadata(folder)
    z, out = difflens_reference(t, k, kernel, h)
    x = sae.map_to_inputs(h)
    torch.testing.assert_close(sae.inputs_to_map(sae(x), size, size), out, atol=1e-5, rtol=1e-5)
    ours = our_dense(sae, x)  # (B, P, L)
    torch.testing.assert_close(ours, z.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert (sae.kernel_size, sae.hook, meta["kernel_size"], meta["format"]) == (kernel, "unet.middle", str(kernel),
                                                                                 "difflens")  # fmt: skip


def test_difflens_wrong_decoder_shape(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = write_difflens(tmp_path, 3, 6, 2, 1, g)
    t["decoder.weight"] = rand(g, 6, 3, 1, 1)  # the ConvTranspose2d layout with a kernel of 1
    save_file(t, tmp_path / "sae.safetensors")
    with pytest.raises(
        FormatError, match=r"'decoder.weight' has shape \(6, 3, 1, 1\), expected \(3, 6, 1, 1\)"
    ):
        load_sae(tmp_path)


# ----------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin", ".PT"])
def test_pickles_are_refused_with_the_reason(tmp_path, suffix):
    path = tmp_path / f"sae{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(FormatError, match=r"(?s)sae\.(pt|pth|ckpt|bin|PT).*run arbitrary code.*safetensors"):
        load_sae(path)
    with pytest.raises(FormatError, match="arbitrary code"):
        sae_metadata(path)


def test_pickle_disguised_or_in_a_folder_is_refused(tmp_path):
    (tmp_path / "fake.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(FormatError, match="pickle/zip checkpoint.*arbitrary code"):
        load_sae(tmp_path / "fake.safetensors")
    folder = tmp_path / "unbox"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "state_dict.pth").write_bytes(b"\x80\x04")
    with pytest.raises(FormatError, match="state_dict.pth.*arbitrary code"):
        load_sae(folder)


def test_folder_errors(tmp_path):
    with pytest.raises(FormatError, match="unknown layout.*found nothing"):
        load_sae(tmp_path)
    write_sparsify(tmp_path / "layer.1", 3, 6, 2, torch.Generator().manual_seed(0))
    write_sparsify(tmp_path / "layer.2", 3, 6, 2, torch.Generator().manual_seed(1))
    with pytest.raises(FormatError, match="several SAEs.*layer.1, layer.2"):
        load_sae(tmp_path)
    (tmp_path / "layer.1" / "cfg.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"cfg.json: not readable as JSON"):
        load_sae(tmp_path / "layer.1")


# ----------------------------------------------------------------------------------------------- damaged files
@pytest.fixture
def native(tmp_path):
    path = tmp_path / "sae.safetensors"
    save_sae(SparseAutoencoder(4, 8, 2), path)
    return path


def test_truncated_file(native):
    data = native.read_bytes()
    native.write_bytes(data[:-10])
    with pytest.raises(
        FormatError, match=r"sae.safetensors: tensor .* ends at byte \d+ .* only \d+ data bytes"
    ):
        load_sae(native)
    native.write_bytes(data[:5])
    with pytest.raises(FormatError, match="truncated: 5 bytes"):
        load_sae(native)


def test_header_longer_than_the_file(native):
    data = native.read_bytes()
    native.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    with pytest.raises(FormatError, match=r"header declares more bytes than the \d+ that follow"):
        read_header(native)


def test_offsets_that_disagree_with_the_shape(tmp_path):
    header = json.dumps({"W": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(FormatError, match=r"needs 16 bytes but its offsets \[0, 8\) hold 8"):
        read_header(path)
    path.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(FormatError, match="header is not valid JSON"):
        read_header(path)


def native_with(path, tensors, **meta):
    metadata = {"format": "diffbias.sae", "format_version": "1", "d_in": "4", "num_latents": "8", "k": "2",
                "kernel_size": "1", "hook": "unet.middle", "model_family": "x", **meta}  # fmt: skip
    save_file(tensors, path, metadata={k: v for k, v in metadata.items() if v is not None})


def good_tensors():
    return {
        "W_enc": torch.randn(8, 4),
        "b_enc": torch.zeros(8),
        "W_dec": torch.randn(8, 4),
        "b_dec": torch.zeros(4),
    }


@pytest.mark.parametrize(
    ("change", "meta", "message"),
    [
        (lambda t: t.pop("b_dec"), {}, r"missing tensor\(s\) \['b_dec'\]"),
        (lambda t: t.update(W_dec=torch.randn(8, 5)), {}, r"'W_dec' has shape \(8, 5\), expected \(8, 4\)"),
        (
            lambda t: t.update(W_enc=torch.ones(8, 4, dtype=torch.int32)),
            {},
            "'W_enc' is torch.int32, expected a floating",
        ),
        (lambda t: t["W_enc"].__setitem__((0, 0), float("nan")), {}, "'W_enc' holds 1 non-finite"),
        (lambda t: t.update(extra=torch.zeros(1)), {}, r"unexpected tensor\(s\) \['extra'\]"),
        (lambda t: None, {"format": None}, "unknown layout: metadata 'format' is None"),
        (lambda t: None, {"format_version": "2"}, "format_version '2'.*update diffbias"),
        (lambda t: None, {"k": "zero"}, "metadata 'k' must be a positive integer, found 'zero'"),
        (lambda t: None, {"fingerprint": "0123456789abcdef"}, "does not match the recorded 0123456789abcdef"),
    ],
)
def test_damaged_native_files(tmp_path, change, meta, message):
    tensors = good_tensors()
    change(tensors)
    path = tmp_path / "x.safetensors"
    native_with(path, tensors, **meta)
    with pytest.raises(FormatError, match=message) as info:
        load_sae(path)
    assert str(path) in str(info.value)


def test_metadata_reads_only_the_header(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = good_tensors()
    tensors["W_enc"][0, 0] = float("nan")  # data damage is not looked at by the cheap listing
    native_with(path, tensors)
    assert sae_metadata(path)["num_latents"] == "8"


def test_writes_are_atomic(native):
    before = native.read_bytes()
    with pytest.raises(ValueError):
        write_safetensors({"a": torch.zeros(4, 4).T[::2]}, {}, native)  # safetensors refuses non-contiguous
    assert native.read_bytes() == before
    assert sorted(p.name for p in native.parent.iterdir()) == [native.name], "no temporary file left behind"
