"""SaeHandle: an SAE file opened without its weights; decoder rows read as slices, verified before use."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffbias_core import FormatError, SparseAutoencoder, load_sae, save_sae
from diffbias_core.sae.formats import read_header
from diffbias_core.sae.lazy import SaeHandle, open_sae
from tests.core.test_formats import write_difflens, write_saelens, write_sparsify


def native(tmp_path, dtype=torch.float32, kernel=1, name="sae.safetensors"):
    sae = SparseAutoencoder(5, 40, 3, kernel_size=kernel, hook="unet.output.1", model_family="sd15")
    sae.reset_parameters(torch.Generator().manual_seed(3))
    sae = sae.to(dtype)
    save_sae(sae, tmp_path / name)
    return sae, tmp_path / name


def flip_byte(path: Path, tensor: str, offset: int = 0) -> None:
    """Change one byte inside ``tensor``'s data (the header stays valid)."""
    header, _ = read_header(path)
    with open(path, "rb") as file:
        start = 8 + int.from_bytes(file.read(8), "little")
    at = start + header[tensor]["data_offsets"][0] + offset
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", [1, 3])
def test_native_rows_and_fingerprint_equal_the_whole_load(tmp_path, dtype, kernel):
    sae, path = native(tmp_path, dtype, kernel)
    handle = open_sae(path)
    assert (handle.d_in, handle.num_latents, handle.k, handle.kernel_size, handle.n_in) == (
        5, 40, 3, kernel, 5 * kernel * kernel)  # fmt: skip
    assert (handle.hook, handle.model_family, handle.dtype) == ("unet.output.1", "sd15", dtype)
    ids = torch.tensor([0, 7, 8, 39])
    rows = handle.decoder_rows(ids)
    assert rows.dtype == dtype and torch.equal(rows, sae.w_dec_flat.detach()[ids])
    assert handle.fingerprint() == load_sae(path).fingerprint()
    assert not handle.is_loaded, "rows and fingerprint must not load the whole SAE"


def test_rows_never_read_the_encoder(tmp_path):
    """A damaged encoder: the whole load refuses the file, the rows of an encoder-free edit are still exact."""
    sae, path = native(tmp_path)
    flip_byte(path, "W_enc")
    with pytest.raises(FormatError, match=r"tensor\(s\) \['W_enc'\] does not match"):
        load_sae(path)
    handle = open_sae(path)
    assert torch.equal(handle.decoder_rows(torch.tensor([2, 5])), sae.w_dec_flat.detach()[[2, 5]])
    assert not handle.is_loaded


def test_a_damaged_decoder_is_refused_before_a_row_is_used(tmp_path):
    _, path = native(tmp_path)
    flip_byte(path, "W_dec", offset=4 * 5 * 30)  # in row 30, which is not asked for
    handle = open_sae(path)
    with pytest.raises(
        FormatError, match=r"sae.safetensors: the data of tensor\(s\) \['W_dec'\] does not match"
    ):
        handle.decoder_rows(torch.tensor([1]))


def test_a_file_without_digests_is_checked_by_its_fingerprint(tmp_path):
    sae, _ = native(tmp_path)
    tensors = {
        name: getattr(sae, name).detach().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    metadata = {**json.loads(json.dumps(_native_metadata(sae))), "fingerprint": "0" * 16}
    save_file(tensors, tmp_path / "old.safetensors", metadata)
    with pytest.raises(FormatError, match=r"old.safetensors: decoder fingerprint [0-9a-f]{16} does not match "
                                          r"the recorded 0000000000000000"):  # fmt: skip
        open_sae(tmp_path / "old.safetensors").fingerprint()
    metadata["fingerprint"] = sae.fingerprint()
    save_file(tensors, tmp_path / "good.safetensors", metadata)
    assert open_sae(tmp_path / "good.safetensors").fingerprint() == sae.fingerprint()


def _native_metadata(sae):
    from diffbias_core.sae.formats import sae_file_metadata

    return sae_file_metadata(sae)


def test_non_finite_rows_are_refused(tmp_path):
    sae, _ = native(tmp_path)
    tensors = {
        name: getattr(sae, name).detach().clone().contiguous()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    tensors["W_dec"][3, 1] = float("nan")
    metadata = _native_metadata(sae)
    del metadata["fingerprint"]
    save_file(tensors, tmp_path / "nan.safetensors", metadata)
    with pytest.raises(FormatError, match="nan.safetensors: tensor 'W_dec' holds non-finite values"):
        open_sae(tmp_path / "nan.safetensors").decoder_rows(torch.tensor([0]))


PUBLISHED = ["sparsify", "difflens-1", "difflens-4", "saelens", "saelens-scaled", "saelens-rescaled"]


def write_published(folder, layout, dtype=torch.float32, latents=12, d_in=4):
    """An SAE folder in ``layout`` (see PUBLISHED); returns the weight file."""
    g = torch.Generator().manual_seed(5)
    if layout == "sparsify":
        write_sparsify(folder, d_in, latents, 2, g)
    elif layout.startswith("difflens"):
        write_difflens(folder, d_in, latents, 2, int(layout[-1]), g)
    else:
        scaling = torch.rand(latents, generator=g) + 0.5 if layout == "saelens-scaled" else None
        cfg = {"architecture": "topk", "k": 2, "rescale_acts_by_decoder_norm": layout == "saelens-rescaled"}
        write_saelens(folder, d_in, latents, g, cfg, scaling=scaling)
    weight = folder / ("sae_weights.safetensors" if layout.startswith("saelens") else "sae.safetensors")
    if dtype != torch.float32:  # the same tensors stored in dtype
        tensors = {name: t.to(dtype) for name, t in load_file(weight).items()}
        save_file(tensors, weight)
    return weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", PUBLISHED)
def test_published_layouts_give_the_rows_of_the_imported_sae(tmp_path, layout, dtype):
    weight = write_published(tmp_path / "layer", layout, dtype)
    whole = load_sae(tmp_path / "layer")
    handle = open_sae(weight, hook="unet.middle")
    ids = torch.tensor([1, 4, 11, 4])
    rows = handle.decoder_rows(ids)
    assert rows.dtype == whole.dtype and torch.equal(rows, whole.w_dec_flat.detach()[ids])
    assert handle.fingerprint() == whole.fingerprint()
    assert handle.is_loaded == (layout == "saelens-rescaled"), (
        "only an SAELens decoder divided by its row norms is loaded whole"
    )


@pytest.mark.parametrize("layout", ["difflens-1", "saelens-scaled"])
def test_published_rows_stream_in_chunks(tmp_path, monkeypatch, layout):
    """Chunks of a few rows (stored rows of a transposed decoder, blocks of latents for the fingerprint, the
    last one shorter): the same rows and fingerprint as the whole load, and a damaged row is refused."""
    import diffbias_core.sae.lazy as lazy

    weight = write_published(tmp_path / "layer", layout, latents=40, d_in=6)
    whole = load_sae(tmp_path / "layer")
    monkeypatch.setattr(lazy, "_CHUNK_BYTES", 3 * 4 * 40 if layout == "difflens-1" else 3 * 4 * 6)
    handle = open_sae(weight, hook="unet.middle")
    ids = torch.tensor([39, 0, 17])
    assert torch.equal(handle.decoder_rows(ids), whole.w_dec_flat.detach()[ids])
    assert handle.fingerprint() == whole.fingerprint() and not handle.is_loaded
    tensors = load_file(weight)
    name = "decoder.weight" if layout == "difflens-1" else "W_dec"
    tensors[name].reshape(-1)[-1] = float("inf")  # the last latent's last channel
    save_file(tensors, weight)
    with pytest.raises(FormatError, match=f"tensor {name!r} holds non-finite values"):
        open_sae(weight, hook="unet.middle").decoder_rows(torch.tensor([0]))


def test_out_of_range_ids_and_in_memory_handles(tmp_path):
    sae, path = native(tmp_path)
    with pytest.raises(ValueError, match=r"latent ids must lie in \[0, 40\), got \[40\]"):
        open_sae(path).decoder_rows(torch.tensor([40]))
    handle = SaeHandle.of(sae)
    assert handle.is_loaded and handle.load() is sae and handle.fingerprint() == sae.fingerprint()
    assert torch.equal(handle.decoder_rows(torch.tensor([3])), sae.w_dec_flat.detach()[[3]])


def test_opening_refuses_what_sae_metadata_refuses(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"\x80\x04")
    with pytest.raises(FormatError, match="refusing to load a pickle-based '.pt' file"):
        open_sae(tmp_path / "x.pt")
    with pytest.raises(FormatError, match="no such file"):
        open_sae(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decoder_streams_in_chunks_of_rows(tmp_path, monkeypatch, dtype):
    """Chunks of 3 rows (the last one shorter): the same digest and fingerprint as one read of the whole."""
    import diffbias_core.sae.lazy as lazy

    sae, path = native(tmp_path, dtype, kernel=2)
    monkeypatch.setattr(lazy, "_CHUNK_BYTES", 3 * 4 * sae.n_in)
    assert open_sae(path).fingerprint() == load_sae(path).fingerprint()
    flip_byte(
        path, "W_dec", offset=(39 * sae.n_in + 1) * (4 if dtype == torch.float32 else 2)
    )  # the last row
    with pytest.raises(FormatError, match=r"\['W_dec'\] does not match the recorded digest"):
        open_sae(path).fingerprint()


def test_a_non_finite_saelens_scaling_factor_is_refused(tmp_path):
    weight = write_published(tmp_path / "layer", "saelens-scaled")
    tensors = load_file(weight)
    tensors["scaling_factor"][3] = float("nan")
    save_file(tensors, weight)
    with pytest.raises(
        FormatError, match=r"sae_weights.safetensors: tensor 'scaling_factor' holds non-finite"
    ):
        open_sae(weight, hook="unet.middle").decoder_rows(torch.tensor([0]))
