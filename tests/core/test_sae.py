"""SparseAutoencoder math against naive references written out here."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffbias_core import SparseAutoencoder, SparseCode
from diffbias_core.sae.model import expansion_factor, fvu


def make_sae(d_in=6, num_latents=20, k=3, kernel_size=1, seed=0, dtype=torch.float32):
    """A seeded SAE with random (non-tied) weights and non-zero biases."""
    sae = SparseAutoencoder(d_in, num_latents, k, kernel_size=kernel_size, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


def naive_dense_code(sae, x):
    """Per vector: pre = relu(sum_i W_enc[j, i] (x_i - b_dec_i) + b_enc_j); keep the k largest, zero the rest."""
    w = sae.W_enc.detach().double().reshape(sae.num_latents, -1)
    b_dec = sae.b_dec.detach().double().repeat_interleave(sae.kernel_size**2)
    rows = x.double().reshape(-1, w.shape[1])
    out = torch.zeros(rows.shape[0], sae.num_latents, dtype=torch.float64)
    for r, row in enumerate(rows):
        pre = [
            max(0.0, float((w[j] * (row - b_dec)).sum() + sae.b_enc[j].detach().double()))
            for j in range(sae.num_latents)
        ]
        for j in sorted(range(sae.num_latents), key=lambda j: -pre[j])[: sae.k]:
            out[r, j] = pre[j]
    return out.reshape(*x.shape[:-1], sae.num_latents)


def dense_from_code(code: SparseCode, num_latents: int) -> torch.Tensor:
    return torch.zeros(*code.indices.shape[:-1], num_latents, dtype=code.values.dtype).scatter(
        -1, code.indices, code.values
    )


def test_encode_matches_naive_topk():
    sae = make_sae()
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    code = sae.encode(x)
    assert code.values.shape == code.indices.shape == (2, 5, 3)
    assert code.indices.dtype == torch.int64
    assert (code.values[..., :-1] >= code.values[..., 1:]).all(), "values must be in descending order"
    torch.testing.assert_close(
        dense_from_code(code, 20).double(), naive_dense_code(sae, x), atol=1e-5, rtol=1e-5
    )


def test_decode_matches_dense_reference():
    sae = make_sae()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    code = sae.encode(x)
    dense = dense_from_code(code, 20)
    reference = torch.stack(
        [sum(dense[r, j] * sae.W_dec[j] for j in range(20)) + sae.b_dec for r in range(4)]
    )
    torch.testing.assert_close(sae.decode(code), reference)
    torch.testing.assert_close(sae.decode_dense(dense), reference)
    torch.testing.assert_close(sae(x), reference)
    torch.testing.assert_close(sae.decode_sparse(code.indices, code.values), reference - sae.b_dec)


def test_decode_sparse_handles_empty_and_rejects_mismatch():
    sae = make_sae()
    assert torch.equal(
        sae.decode_sparse(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0)), torch.zeros(3, 6)
    )
    assert sae.decode_sparse(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)).shape == (0, 6)
    with pytest.raises(ValueError, match="one shape"):
        sae.decode_sparse(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 1))


def test_kernel_variant_is_a_conv_and_conv_transpose():
    """Kernel K: encoder = Conv2d(C, L, K) on a K x K map, decoder = ConvTranspose2d(L, C, K)."""
    sae = make_sae(d_in=3, num_latents=10, k=2, kernel_size=4)
    h = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x = sae.map_to_inputs(h)
    assert x.shape == (2, 1, 48)
    torch.testing.assert_close(sae.inputs_to_map(x, 4, 4), h, rtol=0, atol=0)
    pre = F.relu(F.conv2d(h - sae.b_dec.view(1, 3, 1, 1), sae.W_enc, sae.b_enc)).flatten(1)  # (2, L)
    torch.testing.assert_close(sae.pre_activations(x)[:, 0], pre)
    code = sae.encode(x)
    dense = dense_from_code(code, 10)[:, 0]  # (2, L)
    recon = F.conv_transpose2d(dense.view(2, 10, 1, 1), sae.W_dec, sae.b_dec)  # (2, 3, 4, 4)
    torch.testing.assert_close(sae.inputs_to_map(sae.decode(code), 4, 4), recon)
    with pytest.raises(ValueError, match="4x4 kernel.*8x8"):
        sae.map_to_inputs(torch.zeros(1, 3, 8, 8))


def test_map_layout_per_token():
    sae = make_sae()
    h = torch.randn(2, 6, 3, 5)
    x = sae.map_to_inputs(h)
    assert x.shape == (2, 15, 6)
    torch.testing.assert_close(x[1, 2 * 5 + 4], h[1, :, 2, 4], rtol=0, atol=0)
    assert torch.equal(sae.inputs_to_map(x, 3, 5), h)
    with pytest.raises(ValueError, match="expects width 6.*has width 7"):
        sae.map_to_inputs(torch.zeros(1, 7, 2, 2))
    with pytest.raises(ValueError, match="inputs of width 6.*got width 5"):
        sae.encode(torch.zeros(2, 5))


@settings(max_examples=30, deadline=None)
@given(
    n_in=st.integers(4, 12),
    data=st.data(),
)
def test_k_sparse_code_round_trips(n_in, data):
    """With an orthonormal dictionary (W_enc = W_dec, L <= n_in), decode then encode returns the code."""
    num_latents = data.draw(st.integers(2, n_in))
    k = data.draw(st.integers(1, num_latents))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    w = q[:num_latents].float()  # (L, n_in) orthonormal rows
    b_dec = torch.randn(n_in, generator=g)
    sae = SparseAutoencoder.from_weights(w.clone(), torch.zeros(num_latents), w.clone(), b_dec, k)
    indices = torch.randperm(num_latents, generator=g)[:k]
    values = (
        torch.arange(k, 0, -1, dtype=torch.float32) + torch.rand(k, generator=g) * 0.5
    )  # distinct, descending
    x = sae.decode(SparseCode(values[None], indices[None]))
    code = sae.encode(x)
    assert torch.equal(code.indices[0], indices)
    torch.testing.assert_close(code.values[0], values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_float32(dtype):
    sae = make_sae(dtype=torch.float32)
    low = make_sae(dtype=dtype)
    with torch.no_grad():
        for p, q in zip(sae.parameters(), low.parameters(), strict=True):
            p.copy_(q.float())  # the same (rounded) weights in both
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    out = low(x)
    assert out.dtype == dtype
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(out.float(), sae(x.to(dtype).float()), atol=tol, rtol=tol)


def test_fingerprint_identifies_the_decoder():
    sae = make_sae()
    same = make_sae()
    assert sae.fingerprint() == same.fingerprint() and len(sae.fingerprint()) == 16
    with torch.no_grad():
        same.W_enc.add_(1.0)
    assert sae.fingerprint() == same.fingerprint(), "the encoder does not change which latent an id names"
    with torch.no_grad():
        same.W_dec[3, 2] += 1e-3
    assert sae.fingerprint() != same.fingerprint()


def test_from_weights_validates_shapes_and_keeps_tensors():
    w = torch.randn(5, 3)
    sae = SparseAutoencoder.from_weights(w, torch.zeros(5), w.clone(), torch.zeros(3), 2, hook="dit.double.3")
    assert (sae.d_in, sae.num_latents, sae.k, sae.kernel_size, sae.hook) == (3, 5, 2, 1, "dit.double.3")
    assert sae.W_enc.data_ptr() == w.data_ptr()
    with pytest.raises(ValueError, match=r"b_dec must have shape \(3,\), got \(4,\)"):
        SparseAutoencoder.from_weights(w, torch.zeros(5), w, torch.zeros(4), 2)
    with pytest.raises(ValueError, match="share one floating dtype"):
        SparseAutoencoder.from_weights(w, torch.zeros(5), w.double(), torch.zeros(3), 2)
    conv = torch.randn(5, 3, 2, 2)
    assert SparseAutoencoder.from_weights(conv, torch.zeros(5), conv, torch.zeros(3), 2).kernel_size == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 30}, "k must be <= num_latents"),
        ({"d_in": True}, "d_in must be a positive integer"),
        ({"hook": ""}, "hook must be a non-empty string"),
        ({"provenance": {"a": 1}}, "provenance keys and values must be strings"),
    ],
)
def test_constructor_validation(kwargs, message):
    args = {"d_in": 4, "num_latents": 20, "k": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        SparseAutoencoder(args.pop("d_in"), args.pop("num_latents"), args.pop("k"), **args)


def test_reset_parameters_is_reproducible_with_a_generator_and_unit_norm():
    a, b = SparseAutoencoder(4, 8, 2), SparseAutoencoder(4, 8, 2)
    a.reset_parameters(torch.Generator().manual_seed(7))
    b.reset_parameters(torch.Generator().manual_seed(7))
    assert torch.equal(a.W_dec, b.W_dec)
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(8))
    assert SparseAutoencoder(4, 8, 2, device="meta").W_dec.is_meta


def test_fvu_and_expansion():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 2.5], [3.0, 4.0]])
    # sum |x - x_hat|^2 = 0.25; sum |x - mean|^2 = 4 * 1 = 4
    torch.testing.assert_close(fvu(x, x_hat), torch.tensor(0.25 / 4.0))
    assert expansion_factor(make_sae(d_in=3, num_latents=12, kernel_size=2)) == 1.0


@pytest.mark.parametrize("kernel_size", [1, 2])
def test_copy_to_copies_everything_and_shares_nothing(kernel_size):
    sae = make_sae(kernel_size=kernel_size)
    sae.hook, sae.model_family, sae.provenance = "dit.single.4", "flux", {"steps": "12"}
    fingerprint = sae.fingerprint()
    for device, dtype in (
        (None, None),
        ("cpu", torch.float32),
        ("cpu", torch.float64),
        (None, torch.bfloat16),
    ):
        copy = sae.copy_to(device, dtype)
        want = sae.dtype if dtype is None else dtype
        assert (copy.d_in, copy.num_latents, copy.k, copy.kernel_size) == (6, 20, 3, kernel_size)
        assert (copy.hook, copy.model_family, copy.provenance) == ("dit.single.4", "flux", {"steps": "12"})
        assert copy.dtype == want and copy.device == torch.device("cpu")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            source, copied = getattr(sae, name), getattr(copy, name)
            assert copied.data_ptr() != source.data_ptr()
            assert torch.equal(copied, source.detach().to(want))
        assert copy.fingerprint() == fingerprint  # the same dictionary, also when rounded
        copy.provenance["steps"] = "13"
        with torch.no_grad():
            copy.W_dec.add_(1.0)
            copy.b_enc.add_(1.0)
        assert sae.provenance == {"steps": "12"} and sae.fingerprint() == fingerprint
        if want == torch.float32:
            assert copy.fingerprint() != fingerprint  # a changed copy is another dictionary
    with pytest.raises(ValueError, match="floating dtype, got torch.int64"):
        sae.copy_to(dtype=torch.int64)


def test_copy_to_in_low_precision_keeps_an_unknown_fingerprint_of_the_source():
    sae = make_sae()
    sae.set_known_fingerprint(None)
    assert sae.known_fingerprint() is None
    half = sae.copy_to(dtype=torch.float16)
    assert half.known_fingerprint() == sae.fingerprint()
    rebuilt = SparseAutoencoder.from_weights(
        *(getattr(half, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")), 3
    )
    assert rebuilt.fingerprint() != sae.fingerprint()  # the rounding to float16 shows
